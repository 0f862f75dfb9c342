//! Who is calling: the real uid and gid of this process, from the kernel, and the uid's name
//! from the OS user database (NSS: `/etc/passwd`, LDAP…). Environment variables such as
//! `$USER` are caller-controlled and never consulted.

use serde::Serialize;

/// The caller recorded in every audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// `None` when the user database has no entry for `uid`.
    pub user: Option<String>,
}

impl Identity {
    /// This process's real (not effective) ids: who started it, also under a setuid binary.
    pub fn of_process() -> Identity {
        let uid = rustix::process::getuid();
        let gid = rustix::process::getgid().as_raw();
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid.as_raw())).ok().flatten().map(|u| u.name);
        Identity { uid: uid.as_raw(), gid, user }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_ignores_the_environment() {
        let identity = Identity::of_process();
        assert_eq!(identity.uid, rustix::process::getuid().as_raw());
        assert_eq!(identity.gid, rustix::process::getgid().as_raw());
        if identity.uid == 0 {
            assert_eq!(identity.user.as_deref(), Some("root"));
        }
    }
}
