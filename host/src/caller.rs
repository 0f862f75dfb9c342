//! Who is calling: a uid, a primary gid and the supplementary groups, always from the OS —
//! the kernel's ids of this process for the CLI, a socket peer's credentials (`SO_PEERCRED`)
//! for a daemon. Environment variables such as `$USER` are caller-controlled and never
//! consulted. The access policy ([`crate::access`]) decides on these ids, and audit records
//! carry them.

use std::sync::OnceLock;

use nix::unistd::{Gid, Uid, User};
use serde::Serialize;

/// The identity a call is made on behalf of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (may repeat `gid`).
    #[serde(skip)]
    pub groups: Vec<u32>,
    /// The uid's name in the OS user database (NSS: `/etc/passwd`, LDAP…); `None` without an entry.
    pub user: Option<String>,
    /// For a TLS client: the subject of the certificate it authenticated with (`CN=alice`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

/// The ids of a TLS client whose certificate maps to no local user: `(uid_t)-1`, which the
/// kernel reserves (it means "unchanged" to `setuid`), so no `[users]` or `[groups]` entry
/// of the access policy can match it and only its `default` applies.
pub const UNMAPPED_ID: u32 = u32::MAX;

impl Caller {
    /// This process's real (not effective) ids and supplementary groups: who started it, also
    /// under a setuid binary. Looked up once per process.
    pub fn current() -> &'static Caller {
        static CURRENT: OnceLock<Caller> = OnceLock::new();
        CURRENT.get_or_init(|| {
            let uid = rustix::process::getuid().as_raw();
            let gid = rustix::process::getgid().as_raw();
            let groups = nix::unistd::getgroups()
                .map(|groups| groups.into_iter().map(Gid::as_raw).collect())
                .unwrap_or_default();
            Caller { uid, gid, groups, user: user_name(uid), certificate: None }
        })
    }

    /// A peer known by the uid and gid its socket credentials carry (`SO_PEERCRED`); its
    /// supplementary groups are the user database's for that user (`getgrouplist`), as a
    /// login would get them.
    pub fn from_peer(uid: u32, gid: u32) -> Caller {
        let user = user_name(uid);
        let groups = user
            .as_deref()
            .and_then(|name| std::ffi::CString::new(name).ok())
            .and_then(|name| nix::unistd::getgrouplist(&name, Gid::from_raw(gid)).ok())
            .map(|groups| groups.into_iter().map(Gid::as_raw).collect())
            .unwrap_or_else(|| vec![gid]);
        Caller { uid, gid, groups, user, certificate: None }
    }

    /// A caller with exactly these ids (the groups of a peer read elsewhere, e.g. from
    /// `/proc/PID/status` of a peer that dropped groups).
    pub fn with_groups(uid: u32, gid: u32, groups: Vec<u32>) -> Caller {
        Caller { uid, gid, groups, user: user_name(uid), certificate: None }
    }

    /// A TLS client known by its verified certificate's `subject`: the local user `mapped`
    /// (`(uid, gid)` from the access policy's `[certificates]` table; groups as for a peer),
    /// else nobody ([`UNMAPPED_ID`]): only the policy's `default` applies to it.
    pub fn from_certificate(subject: &str, mapped: Option<(u32, u32)>) -> Caller {
        let base = match mapped {
            Some((uid, gid)) => Caller::from_peer(uid, gid),
            None => Caller { uid: UNMAPPED_ID, gid: UNMAPPED_ID, groups: Vec::new(), user: None, certificate: None },
        };
        Caller { certificate: Some(subject.to_string()), ..base }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// The primary group and the supplementary groups.
    pub fn all_groups(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.gid).chain(self.groups.iter().copied())
    }

    /// `alice (uid 1000)`, or `uid 1000` without a user database entry.
    pub fn describe(&self) -> String {
        match (&self.user, &self.certificate) {
            (Some(name), Some(subject)) => format!("user {name} (uid {}, certificate {subject})", self.uid),
            (None, Some(subject)) => format!("the certificate {subject} (mapped to no user)"),
            (Some(name), None) => format!("user {name} (uid {})", self.uid),
            (None, None) => format!("uid {}", self.uid),
        }
    }
}

fn user_name(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid)).ok().flatten().map(|u| u.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_caller_comes_from_the_kernel_not_the_environment() {
        let caller = Caller::current();
        assert_eq!(caller.uid, rustix::process::getuid().as_raw());
        assert_eq!(caller.gid, rustix::process::getgid().as_raw());
        if caller.uid == 0 {
            assert_eq!(caller.user.as_deref(), Some("root"));
            assert!(caller.is_root());
        }
    }

    #[test]
    fn a_peer_gets_the_user_databases_groups() {
        // root exists everywhere and is in its own primary group.
        let root = Caller::from_peer(0, 0);
        assert_eq!(root.user.as_deref(), Some("root"));
        assert!(root.all_groups().any(|g| g == 0));
        let unknown = Caller::from_peer(4_000_000_000, 4_000_000_000);
        assert_eq!((unknown.user, unknown.groups), (None, vec![4_000_000_000]));
        assert_eq!(Caller::with_groups(7, 8, vec![9]).all_groups().collect::<Vec<_>>(), [8, 9]);
    }
}
