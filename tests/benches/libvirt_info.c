/* The in-process libvirt peer of the dispatch benchmark's `domain.info`: virDomainGetInfo
 * on libvirt's own test driver (test:///default), N calls timed in one process. libvirt's
 * headers are not needed: the four entry points are declared here as libvirt 9.0 exports them.
 *
 *   cc -O2 -o /tmp/libvirt_info tests/benches/libvirt_info.c /usr/lib/x86_64-linux-gnu/libvirt.so.0
 *   /tmp/libvirt_info 1000000          # prints ns per call (median of 5 rounds)
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef struct {
    unsigned char state;
    unsigned long maxMem, memory;
    unsigned short nrVirtCpu;
    unsigned long long cpuTime;
} virDomainInfo;

void *virConnectOpen(const char *name);
void *virDomainLookupByName(void *conn, const char *name);
int virDomainGetInfo(void *domain, virDomainInfo *info);

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    long calls = argc > 1 ? atol(argv[1]) : 1000000;
    void *conn = virConnectOpen("test:///default");
    void *dom = conn ? virDomainLookupByName(conn, "test") : NULL;
    if (!dom) {
        fprintf(stderr, "cannot open test:///default\n");
        return 1;
    }
    virDomainInfo info;
    double rounds[5];
    for (int r = 0; r < 5; r++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long i = 0; i < calls; i++) {
            if (virDomainGetInfo(dom, &info) < 0) {
                fprintf(stderr, "virDomainGetInfo failed\n");
                return 1;
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        rounds[r] = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / calls;
    }
    qsort(rounds, 5, sizeof rounds[0], cmp);
    printf("virDomainGetInfo (libvirt test driver, in process): %.0f ns per call (median of 5 rounds of %ld)\n",
           rounds[2], calls);
    return 0;
}
