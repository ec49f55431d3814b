//! Peer authentication: a client on pgwarden's Unix-domain socket is the
//! operating-system user it runs as, which the kernel reports for the socket.

use std::ffi::CStr;

use crate::error::ClientError;
use crate::tls::Stream;

/// Succeeds when the local client on `stream` runs as the operating-system user
/// named `user`; TCP clients and any other user fail.
pub async fn check(stream: &Stream, user: &str) -> Result<(), ClientError> {
    let failed = || ClientError::PeerFailed(user.to_owned());
    let Stream::Local(socket) = stream else {
        return Err(failed());
    };
    let uid = socket.peer_cred().map_err(|_| failed())?.uid();
    // The user database may be remote (NSS: LDAP, sssd): look it up off the runtime.
    let name = tokio::task::spawn_blocking(move || user_name(uid))
        .await
        .ok()
        .flatten();
    match name {
        Some(name) if name == user => Ok(()),
        _ => Err(failed()),
    }
}

/// The name of the operating-system user `uid`, if it has one.
fn user_name(uid: libc::uid_t) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found = std::ptr::null_mut();
    // SAFETY: every pointer is to memory owned here, and buf's length is passed with it.
    let rc = unsafe { libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside buf.
    let name = unsafe { CStr::from_ptr(entry.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_user_running_the_tests_as_id_does() {
        let id = std::process::Command::new("id")
            .arg("-un")
            .output()
            .unwrap();
        let expected = String::from_utf8(id.stdout).unwrap();
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        assert_eq!(super::user_name(uid).as_deref(), Some(expected.trim()));
        assert_eq!(super::user_name(4_000_000_000), None);
    }
}
