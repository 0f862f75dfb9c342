//! The protocol over a real Unix socket: a test executor stands in for the host.

use std::{
    sync::{mpsc as std_mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use capvirt_plugin_api::Value;
use tokio::net::UnixListener;

use crate::{
    proto::{self, capvirt_client::CapvirtClient},
    serve_unix, CallFailure, Client, ClientError, DriverSupport, ErrorKind, Executor, Hello, IncomingCall,
    PeerIdentity, Reporter, Update, PROTOCOL_MAJOR,
};

/// Answers by capability id: `echo` returns its arguments with the caller's uid, `fail`
/// fails, `chatty` reports before answering, `wait` runs until cancelled.
struct TestExecutor {
    cancelled: Mutex<Option<std_mpsc::Sender<bool>>>,
}

impl Executor for TestExecutor {
    fn hello(&self) -> Hello {
        Hello::new("1.1.0".into(), vec!["echo".into(), "fail".into()], "test".into())
    }

    /// `test:` URIs are described, `refused:` ones refused, others accepted undescribed.
    fn connect(
        &self,
        uri: &str,
        _readonly: bool,
        _options: Option<Value>,
        _peer: Option<PeerIdentity>,
    ) -> Result<Option<DriverSupport>, CallFailure> {
        if uri.starts_with("refused:") {
            return Err(CallFailure::new(ErrorKind::NotFound, format!("no driver serves {uri}")));
        }
        Ok(uri.starts_with("test:").then(|| DriverSupport {
            name: "test".into(),
            version: "1.0.0".into(),
            callable: vec![("echo".into(), 1), ("fail".into(), 2)],
            ignored: vec![("domain.suspnd".into(), "unknown to this registry".into())],
        }))
    }

    fn call(&self, call: IncomingCall, reporter: &Reporter) -> Result<Value, CallFailure> {
        match call.capability.as_str() {
            "echo" => Ok(Value::record([
                ("uri", Value::from(call.uri)),
                ("readonly", Value::Bool(call.readonly)),
                ("args", call.args),
                ("uid", Value::from(call.peer.map(|p| u64::from(p.uid)))),
                ("cn", Value::from(call.certificate.and_then(|c| c.common_name))),
            ])),
            "fail" => Err(CallFailure::new(ErrorKind::NotFound, "domain `nope` not found")),
            "slow" => {
                std::thread::sleep(Duration::from_millis(150));
                Ok(Value::from("slow"))
            }
            "chatty" => {
                reporter.progress(1, 2);
                reporter.event("tick", &Value::record([("n", 1u64)]));
                Ok(Value::Unit)
            }
            "wait" => {
                let started = Instant::now();
                while !reporter.is_cancelled() && started.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if let Some(tx) = self.cancelled.lock().ok().and_then(|mut g| g.take()) {
                    let _ = tx.send(reporter.is_cancelled());
                }
                Ok(Value::Unit)
            }
            other => Err(CallFailure::new(ErrorKind::Denied, format!("capability `{other}` is not in the registry"))),
        }
    }
}

struct Served {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    cancelled: std_mpsc::Receiver<bool>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve(max_message_bytes: usize) -> Served {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let (tx, cancelled) = std_mpsc::channel();
    let executor = Arc::new(TestExecutor { cancelled: Mutex::new(Some(tx)) });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_unix(listener, executor, max_message_bytes, async {
        let _ = stopped.await;
    }));
    Served { _dir: dir, socket, cancelled, _stop: stop }
}

fn ours() -> Hello {
    Hello::new("1.1.0".into(), vec!["echo".into()], "client".into())
}

const LIMIT: usize = 64 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_exchanges_registries_and_a_call_carries_everything() {
    let served = serve(LIMIT).await;
    let client = Client::connect_unix(&served.socket, ours(), LIMIT).await.expect("connects");
    assert_eq!(client.far_side().registry_version, "1.1.0");
    assert!(client.far_side().knows("fail") && !client.far_side().knows("chatty"));
    let args = Value::record([("z", Value::Int(-1)), ("a", Value::UInt(1)), ("b", Value::from(vec![1u8, 2]))]);
    let result = client.call("test:///default", true, "echo", &args, |_| {}).await.expect("transport ok");
    let result = result.expect("call ok");
    assert_eq!(result.get("uri"), Some(&Value::from("test:///default")));
    assert_eq!(result.get("readonly"), Some(&Value::Bool(true)));
    assert_eq!(result.get("args"), Some(&args));
    // SO_PEERCRED: this very process.
    assert_eq!(result.get("uid"), Some(&Value::UInt(u64::from(rustix_uid()))));
}

fn rustix_uid() -> u32 {
    // The test process's uid, read the same way the kernel reports it for the peer.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:").map(str::to_owned)))
        .and_then(|l| l.split_whitespace().next().and_then(|u| u.parse().ok()))
        .unwrap_or(u32::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_describes_the_driver_or_relays_the_refusal() {
    let served = serve(LIMIT).await;
    let client = Client::connect_unix(&served.socket, ours(), LIMIT).await.expect("connects");
    let described = client.connect("test:///default", false, None).await.expect("transport ok").expect("opened");
    let driver = described.expect("a test: URI is described");
    assert_eq!((driver.name.as_str(), driver.callable.len()), ("test", 2));
    assert_eq!(driver.callable[1], ("fail".to_string(), 2));
    assert_eq!(driver.ignored, [("domain.suspnd".to_string(), "unknown to this registry".to_string())]);
    let undescribed = client.connect("other:///x", true, None).await.expect("transport ok");
    assert_eq!(undescribed, Ok(None));
    let refused = client.connect("refused:///x", false, None).await.expect("transport ok");
    assert_eq!(refused.map_err(|f| f.kind), Err(ErrorKind::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_arrives_with_its_kind() {
    let served = serve(LIMIT).await;
    let client = Client::connect_unix(&served.socket, ours(), LIMIT).await.expect("connects");
    let outcome = client.call("test:///default", false, "fail", &Value::Unit, |_| {}).await.expect("transport ok");
    assert_eq!(outcome, Err(CallFailure::new(ErrorKind::NotFound, "domain `nope` not found")));
    let outcome = client.call("test:///default", false, "nope", &Value::Unit, |_| {}).await.expect("transport ok");
    assert_eq!(outcome.map_err(|f| f.kind), Err(ErrorKind::Denied));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_and_events_come_before_the_result() {
    let served = serve(LIMIT).await;
    let client = Client::connect_unix(&served.socket, ours(), LIMIT).await.expect("connects");
    let mut updates = Vec::new();
    let outcome = client.call("test:///default", false, "chatty", &Value::Unit, |u| updates.push(u)).await;
    assert_eq!(outcome.expect("transport ok"), Ok(Value::Unit));
    assert_eq!(
        updates,
        [
            Update::Progress { done: 1, total: 2 },
            Update::Event { name: "tick".into(), data: Value::record([("n", 1u64)]) }
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_call_cancels_it_on_the_far_side() {
    let served = serve(LIMIT).await;
    let client = Client::connect_unix(&served.socket, ours(), LIMIT).await.expect("connects");
    let call = client.call("test:///default", false, "wait", &Value::Unit, |_| {});
    // The call is under way after a moment; then its future (and stream) is dropped.
    let timed_out = tokio::time::timeout(Duration::from_millis(200), call).await;
    assert!(timed_out.is_err(), "`wait` only returns when cancelled");
    let cancelled = tokio::task::spawn_blocking(move || served.cancelled.recv_timeout(Duration::from_secs(5)))
        .await
        .expect("joins");
    assert_eq!(cancelled, Ok(true), "the executor saw the cancellation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_by_either_side() {
    let served = serve(1024).await;
    let big = Value::record([("data", Value::from(vec![7u8; 4096]))]);
    // The far side's bound.
    let client = Client::connect_unix(&served.socket, ours(), LIMIT).await.expect("connects");
    let error = client.call("test:///default", false, "echo", &big, |_| {}).await.expect_err("refused");
    assert!(matches!(&error, ClientError::TooLarge(m) if m.contains("1024")), "{error}");
    // This side's bound, before sending.
    let client = Client::connect_unix(&served.socket, ours(), 1024).await.expect("connects");
    let error = client.call("test:///default", false, "echo", &big, |_| {}).await.expect_err("refused");
    assert!(matches!(&error, ClientError::TooLarge(m) if m.contains("1024")), "{error}");
    // The connection still serves calls that fit.
    let outcome = client.call("test:///default", false, "echo", &Value::Unit, |_| {}).await.expect("transport ok");
    assert!(outcome.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_protocol_major_is_refused() {
    let served = serve(LIMIT).await;
    let path = served.socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://capvirt.sock")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
        .expect("connects");
    let mut raw = CapvirtClient::new(channel);
    let mut hello: proto::HelloMessage = ours().into();
    hello.protocol_major = PROTOCOL_MAJOR + 1;
    let status = raw.hello(hello).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains(&format!("protocol major {}", PROTOCOL_MAJOR + 1)), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_daemon_is_a_clear_error_naming_the_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("absent");
    let error = Client::connect_unix(&socket, ours(), LIMIT).await.err().expect("refused");
    let text = error.to_string();
    assert!(matches!(error, ClientError::Unreachable { .. }), "{text}");
    assert!(text.contains(&socket.display().to_string()) && text.contains("No such file"), "{text}");
}

/// A test PKI in a temporary directory: a CA, a server certificate for 127.0.0.1, and
/// client certificates signed by it or by another CA.
mod pki {
    use std::path::{Path, PathBuf};

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

    use crate::TlsFiles;

    pub struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pub pem: String,
    }

    pub fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// Writes `{role}cert.pem`, `{role}key.pem` and `cacert.pem` (of `trusted`) into `dir`.
    pub fn issue(dir: &Path, role: &str, cn: &str, sans: &[&str], by: &Ca, trusted: &Ca) -> TlsFiles {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &by.issuer).expect("signed");
        let files = TlsFiles::in_dir(dir, role);
        write(&files.cert, &cert.pem());
        write(&files.key, &key.serialize_pem());
        write(&files.ca, &trusted.pem);
        files
    }

    fn write(path: &PathBuf, text: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
        // Private keys must be private: the loader refuses others.
        if path.to_string_lossy().ends_with("key.pem") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
    }
}

struct ServedTls {
    dir: tempfile::TempDir,
    port: u16,
    ca: pki::Ca,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve_tls() -> ServedTls {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = pki::ca("test CA");
    let files = pki::issue(&dir.path().join("server"), "server", "daemon", &["127.0.0.1", "localhost"], &ca, &ca);
    let material = files.load().expect("server files load");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, _cancelled) = std_mpsc::channel();
    let executor = Arc::new(TestExecutor { cancelled: Mutex::new(Some(tx)) });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = crate::serve_tls(listener, &material, executor, LIMIT, async {
            let _ = stopped.await;
        })
        .await;
    });
    ServedTls { dir, port, ca, _stop: stop }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_calls_carry_the_verified_client_certificate() {
    let served = serve_tls().await;
    let files = pki::issue(&served.dir.path().join("alice"), "client", "alice", &[], &served.ca, &served.ca);
    let material = files.load().expect("client files load");
    for host in ["127.0.0.1", "localhost"] {
        let client = Client::connect_tls(host, served.port, &material, ours(), LIMIT).await.expect("connects");
        let result = client.call("test:///default", false, "echo", &Value::Unit, |_| {}).await.expect("transport ok");
        let result = result.expect("call ok");
        assert_eq!(result.get("cn"), Some(&Value::from("alice")));
        // No Unix peer on TCP: the certificate is the only identity.
        assert_eq!(result.get("uid"), Some(&Value::from(None::<u64>)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_client_of_another_ca_and_a_server_of_another_ca() {
    let served = serve_tls().await;
    let other = pki::ca("other CA");
    // A client certificate the daemon's CA did not sign: refused at the handshake.
    let files = pki::issue(&served.dir.path().join("mallory"), "client", "alice", &[], &other, &served.ca);
    let material = files.load().expect("client files load");
    let error = Client::connect_tls("127.0.0.1", served.port, &material, ours(), LIMIT).await.err().expect("refused");
    let text = error.to_string();
    assert!(text.contains("refused this client's certificate") && text.contains("mallory/clientcert.pem"), "{text}");
    assert!(text.contains(&format!("tls://127.0.0.1:{}", served.port)), "{text}");
    // A client trusting another CA refuses the daemon.
    let files = pki::issue(&served.dir.path().join("lost"), "client", "alice", &[], &served.ca, &other);
    let material = files.load().expect("client files load");
    let error = Client::connect_tls("127.0.0.1", served.port, &material, ours(), LIMIT).await.err().expect("refused");
    assert!(error.to_string().contains("daemon's certificate is not signed by this client's CA"), "{error}");
    // A name the daemon's certificate does not carry.
    let files = pki::issue(&served.dir.path().join("alice"), "client", "alice", &[], &served.ca, &served.ca);
    let material = files.load().expect("client files load");
    let error = Client::connect_tls("127.0.0.2", served.port, &material, ours(), LIMIT).await.err().expect("refused");
    assert!(matches!(error, ClientError::Unreachable { .. }), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_client_without_a_certificate() {
    let served = serve_tls().await;
    // A raw TLS client that trusts the CA but presents nothing.
    let ca = tonic::transport::Certificate::from_pem(&served.ca.pem);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", served.port))
        .expect("endpoint")
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(ca).domain_name("127.0.0.1"))
        .expect("tls config");
    let outcome = match endpoint.connect().await {
        Ok(channel) => CapvirtClient::new(channel).hello(proto::HelloMessage::from(ours())).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(outcome.is_err(), "a client without a certificate was served");
}

#[test]
fn bad_tls_files_are_named_with_the_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = pki::ca("test CA");
    let files = pki::issue(dir.path(), "client", "alice", &[], &ca, &ca);
    let missing = crate::TlsFiles { ca: dir.path().join("absent.pem"), ..files.clone() };
    let text = missing.load().expect_err("refused").to_string();
    assert!(text.contains("CA certificate") && text.contains("absent.pem") && text.contains("No such file"), "{text}");
    let not_pem = dir.path().join("garbage.pem");
    std::fs::write(&not_pem, "hello\n").expect("write");
    let text = crate::TlsFiles { cert: not_pem.clone(), ..files.clone() }.load().expect_err("refused").to_string();
    assert!(text.contains("garbage.pem") && text.contains("no PEM certificate"), "{text}");
    let cert_as_key = dir.path().join("certaskey.pem");
    std::fs::copy(&files.cert, &cert_as_key).expect("copy");
    std::fs::set_permissions(&cert_as_key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let text = crate::TlsFiles { key: cert_as_key, ..files.clone() }.load().expect_err("refused").to_string();
    assert!(text.contains("private key") && text.contains("no PEM private key"), "{text}");
    // A key group or others can read is refused, naming the mode and the fix; private, it loads.
    for mode in [0o640, 0o604, 0o620] {
        std::fs::set_permissions(&files.key, std::os::unix::fs::PermissionsExt::from_mode(mode)).expect("chmod");
        let text = files.load().expect_err("refused").to_string();
        assert!(text.contains(&format!("mode {mode:04o}")) && text.contains("chmod 600"), "{text}");
    }
    std::fs::set_permissions(&files.key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    assert!(files.load().is_ok());
    // An expired certificate is named with its end date.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let key = rcgen::KeyPair::generate().expect("key");
    let old = dir.path().join("old.pem");
    std::fs::write(&old, params.self_signed(&key).expect("signed").pem()).expect("write");
    let text = crate::TlsFiles { cert: old, ..files.clone() }.load().expect_err("refused").to_string();
    assert!(text.contains("old.pem") && text.contains("expired on Jan  1 00:00:00 2001"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tcp_peer_does_not_hold_up_the_handshakes_of_others() {
    let served = serve_tls().await;
    // Connected, never speaking TLS: its handshake waits (bounded by HANDSHAKE_TIMEOUT) apart.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", served.port)).await.expect("connects");
    let files = pki::issue(&served.dir.path().join("alice"), "client", "alice", &[], &served.ca, &served.ca);
    let material = files.load().expect("client files load");
    let connect = Client::connect_tls("127.0.0.1", served.port, &material, ours(), LIMIT);
    let client = tokio::time::timeout(Duration::from_secs(5), connect).await.expect("not held up").expect("connects");
    let outcome = client.call("test:///default", false, "echo", &Value::Unit, |_| {}).await.expect("transport ok");
    assert!(outcome.is_ok());
}

/// Many calls at once on one connection, from several tasks and threads: each call drives the
/// shared connection while it waits, and the last one standing (the slow call, after every
/// quick one ended) still gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_connection_and_all_complete() {
    let served = serve(LIMIT).await;
    let client = Client::connect_unix(&served.socket, ours(), LIMIT).await.expect("connects");
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.call("test:///default", false, "slow", &Value::Unit, |_| {}).await })
    };
    let mut quick = tokio::task::JoinSet::new();
    for n in 0..40u64 {
        let client = client.clone();
        quick.spawn(async move {
            let args = Value::record([("n", n)]);
            let result = client.call("test:///default", false, "echo", &args, |_| {}).await;
            (n, result)
        });
    }
    let all = async {
        while let Some(joined) = quick.join_next().await {
            let (n, result) = joined.expect("joins");
            let result = result.expect("transport ok").expect("call ok");
            assert_eq!(result.get("args"), Some(&Value::record([("n", n)])));
        }
        slow.await.expect("joins")
    };
    let slow = tokio::time::timeout(Duration::from_secs(10), all).await.expect("every call completes");
    assert_eq!(slow.expect("transport ok"), Ok(Value::from("slow")));
}

/// The isolated driver's transport: one connected socket pair, the server on one end
/// (`serve_connection`), the client on the other (`over_stream`). The peer identity is the
/// kernel's for the pair; the server returns once the client is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_pair_carries_the_protocol_and_the_server_ends_with_the_client() {
    let (ours_end, theirs) = tokio::net::UnixStream::pair().expect("pair");
    let (tx, _cancelled) = std_mpsc::channel();
    let executor = Arc::new(TestExecutor { cancelled: Mutex::new(Some(tx)) });
    let server = tokio::spawn(crate::serve_connection(theirs, executor, LIMIT));
    let name = std::path::Path::new("pair");
    let client = Client::over_stream(ours_end, name, ours(), LIMIT).await.expect("connects");
    assert_eq!(client.far_side().software, "test");
    let mut updates = Vec::new();
    let outcome = client.call("test:///default", false, "chatty", &Value::Unit, |u| updates.push(u)).await;
    assert_eq!(outcome.expect("transport ok"), Ok(Value::Unit));
    assert_eq!(updates.len(), 2, "{updates:?}");
    let result = client.call("test:///default", true, "echo", &Value::Unit, |_| {}).await.expect("transport ok");
    assert_eq!(result.expect("call ok").get("uid"), Some(&Value::UInt(u64::from(rustix_uid()))));
    drop(client);
    let served = tokio::time::timeout(Duration::from_secs(5), server).await.expect("the server ended");
    assert!(served.expect("joins").is_ok());
}

/// A call on a connection whose far side has gone fails as a transport error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_after_the_far_side_closed_fails_promptly() {
    let (ours_end, theirs) = tokio::net::UnixStream::pair().expect("pair");
    let (tx, _cancelled) = std_mpsc::channel();
    let executor = Arc::new(TestExecutor { cancelled: Mutex::new(Some(tx)) });
    let server = tokio::spawn(crate::serve_connection(theirs, executor, LIMIT));
    let client = Client::over_stream(ours_end, std::path::Path::new("pair"), ours(), LIMIT).await.expect("connects");
    server.abort();
    let _ = server.await;
    let call = client.call("test:///default", false, "echo", &Value::Unit, |_| {});
    let outcome = tokio::time::timeout(Duration::from_secs(5), call).await.expect("no hang");
    assert!(outcome.is_err(), "{outcome:?}");
}

#[test]
fn driver_error_kinds_cross_the_wire_exactly_including_later_codes() {
    use capvirt_plugin_api::{ErrorKind as Driver, PluginError};
    let later = Driver::from_code(4242);
    for kind in Driver::KNOWN.into_iter().chain([later]) {
        let failure = CallFailure::from_driver(&PluginError::new(kind, "why"));
        let back = CallFailure::from_wire(failure.to_wire());
        assert_eq!(back, failure, "{kind:?}");
        assert_eq!(back.driver_error(), Some(PluginError::new(kind, "why")));
    }
    assert_eq!(CallFailure::from_driver(&PluginError::new(later, "why")).kind, ErrorKind::Other);
    // Not representable in the wire's int32: still a driver error, as a driver failure.
    let huge = CallFailure::from_driver(&PluginError::new(Driver::from_code(u32::MAX), "why"));
    assert_eq!(CallFailure::from_wire(huge.to_wire()).driver_kind, Some(Driver::DriverFailure));
    // "Not a driver error" stays that.
    let host_refusal = CallFailure::new(ErrorKind::Denied, "no");
    assert_eq!(CallFailure::from_wire(host_refusal.to_wire()).driver_kind, None);
}
