//! Who holds a refresh lease, and when its death is certain.
//!
//! A lease holder is named by an owner string that carries what is needed
//! to prove, from another process, that it is gone: host, boot id, PID
//! namespace, pid and the process's start time. A pid alone proves nothing:
//! in another PID namespace (a container with host networking) the same
//! number is another process, and under `ProtectProc=invisible` a live
//! process has no `/proc` entry we can see. So death is certain only when
//! every one of these holds:
//!
//! - same host, same boot (`/proc/sys/kernel/random/boot_id`), same PID
//!   namespace (the inode of `/proc/self/ns/pid`), all known on both sides;
//! - and the pid does not exist (`kill(pid, 0)` says `ESRCH`) or exists with
//!   another start time (field 22 of `/proc/<pid>/stat`): a later process
//!   that reused the number.
//!
//! Anything else (an old-format owner, another host, a field we cannot
//! read, `EPERM`) is uncertain: the holder may live, and its lease is only
//! taken over once it has visibly stopped renewing (see `clock::LeaseWatch`).
//!
//! Must not: take over a holder it cannot prove dead.

use std::sync::OnceLock;

/// Prefix of the owner format; older owners (`host:pid:nonce`) lack it and
/// are treated as uncertain.
const PREFIX: &str = "tk2;";

/// What identifies a process across the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub host: String,
    pub boot_id: Option<String>,
    pub pid_ns: Option<u64>,
    pub pid: u32,
    pub start_time: Option<u64>,
}

impl Identity {
    /// This process.
    pub fn current() -> &'static Identity {
        static ME: OnceLock<Identity> = OnceLock::new();
        ME.get_or_init(|| {
            let pid = std::process::id();
            Identity {
                host: hostname(),
                boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty() && is_token(s)),
                pid_ns: pid_namespace(),
                pid,
                start_time: start_time(pid),
            }
        })
    }

    /// The owner string for a lease held by this identity; `nonce` tells
    /// two engines of one process apart.
    pub fn owner(&self, nonce: u32) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        format!(
            "{PREFIX}host={};boot={};pidns={};pid={};start={};nonce={nonce:08x}",
            self.host,
            opt(self.boot_id.clone()),
            opt(self.pid_ns.map(|n| n.to_string())),
            self.pid,
            opt(self.start_time.map(|n| n.to_string())),
        )
    }

    /// Parses an owner string; `None` for old or foreign formats.
    pub fn parse(owner: &str) -> Option<Identity> {
        let rest = owner.strip_prefix(PREFIX)?;
        let mut host = None;
        let mut boot_id = None;
        let mut pid_ns = None;
        let mut pid = None;
        let mut start_time = None;
        for field in rest.split(';') {
            let (k, v) = field.split_once('=')?;
            let known = (v != "-").then(|| v.to_string());
            match k {
                "host" => host = Some(v.to_string()),
                "boot" => boot_id = known,
                "pidns" => pid_ns = known.and_then(|v| v.parse().ok()),
                "pid" => pid = v.parse().ok(),
                "start" => start_time = known.and_then(|v| v.parse().ok()),
                _ => {}
            }
        }
        Some(Identity {
            host: host?,
            boot_id,
            pid_ns,
            pid: pid?,
            start_time,
        })
    }
}

/// What the system says about a pid in our namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidProbe {
    /// `kill(pid, 0)` failed with `ESRCH`: no such process.
    Absent,
    /// The process exists; its start time if `/proc` shows it.
    Present { start_time: Option<u64> },
    /// Neither could be told.
    Unknown,
}

/// Asks the system about `pid`.
pub fn probe(pid: u32) -> PidProbe {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return PidProbe::Unknown;
    };
    if raw <= 0 {
        return PidProbe::Unknown;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(raw, 0) };
    if rc == 0 {
        return PidProbe::Present {
            start_time: start_time(pid),
        };
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ESRCH) => PidProbe::Absent,
        // EPERM: it exists, owned by someone else.
        Some(libc::EPERM) => PidProbe::Present {
            start_time: start_time(pid),
        },
        _ => PidProbe::Unknown,
    }
}

/// Whether the lease holder `owner` is certainly dead, as seen by `me`
/// with `probe` (see the module doc for the rule).
pub fn certainly_dead(owner: &str, me: &Identity, probe: impl Fn(u32) -> PidProbe) -> bool {
    let Some(holder) = Identity::parse(owner) else {
        return false;
    };
    let same = |a: &Option<String>, b: &Option<String>| a.is_some() && a == b;
    if holder.host != me.host
        || !same(&holder.boot_id, &me.boot_id)
        || holder.pid_ns.is_none()
        || holder.pid_ns != me.pid_ns
    {
        return false;
    }
    match probe(holder.pid) {
        PidProbe::Absent => true,
        PidProbe::Present {
            start_time: Some(now),
        } => holder.start_time.is_some_and(|then| then != now),
        PidProbe::Present { start_time: None } | PidProbe::Unknown => false,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty() && is_token(s))
        .unwrap_or_else(|| "localhost".into())
}

/// Whether `s` can go into an owner field unescaped.
fn is_token(s: &str) -> bool {
    !s.contains([';', '=']) && !s.chars().any(char::is_whitespace)
}

fn pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks since boot).
/// The command name (field 2) may hold spaces and parentheses, so fields
/// are counted after its closing parenthesis.
fn start_time(pid: u32) -> Option<u64> {
    parse_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let after = stat.get(stat.rfind(')')? + 1..)?;
    // Fields 3.. follow; 22 is the 20th of them.
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Identity {
        Identity {
            host: "box".into(),
            boot_id: Some("b00t".into()),
            pid_ns: Some(4026531836),
            pid: 100,
            start_time: Some(5000),
        }
    }

    fn holder(f: impl FnOnce(&mut Identity)) -> String {
        let mut h = Identity {
            pid: 200,
            start_time: Some(7000),
            ..me()
        };
        f(&mut h);
        h.owner(1)
    }

    #[test]
    fn owner_strings_round_trip() {
        let id = me();
        assert_eq!(Identity::parse(&id.owner(7)), Some(id));
        let unknown = Identity {
            boot_id: None,
            pid_ns: None,
            start_time: None,
            ..me()
        };
        assert_eq!(Identity::parse(&unknown.owner(7)), Some(unknown));
    }

    #[test]
    fn a_missing_pid_in_our_namespace_and_boot_is_dead() {
        assert!(certainly_dead(&holder(|_| {}), &me(), |_| PidProbe::Absent));
    }

    #[test]
    fn a_reused_pid_is_dead_but_the_same_process_is_not() {
        let reused = |_| PidProbe::Present {
            start_time: Some(9999),
        };
        assert!(certainly_dead(&holder(|_| {}), &me(), reused));
        let same = |_| PidProbe::Present {
            start_time: Some(7000),
        };
        assert!(!certainly_dead(&holder(|_| {}), &me(), same));
        // Our own pid, our own start time: another engine of this process.
        let ours = holder(|h| {
            h.pid = 100;
            h.start_time = Some(5000);
        });
        let us = |_| PidProbe::Present {
            start_time: Some(5000),
        };
        assert!(!certainly_dead(&ours, &me(), us));
    }

    #[test]
    fn anything_uncertain_is_alive() {
        let absent = |_| PidProbe::Absent;
        // Another PID namespace: the pid we cannot see may well run there.
        assert!(!certainly_dead(
            &holder(|h| h.pid_ns = Some(1)),
            &me(),
            absent
        ));
        assert!(!certainly_dead(&holder(|h| h.pid_ns = None), &me(), absent));
        // Another boot, another host, an unknown boot id.
        assert!(!certainly_dead(
            &holder(|h| h.boot_id = Some("other".into())),
            &me(),
            absent
        ));
        assert!(!certainly_dead(
            &holder(|h| h.boot_id = None),
            &me(),
            absent
        ));
        assert!(!certainly_dead(
            &holder(|h| h.host = "b".into()),
            &me(),
            absent
        ));
        // Present but its start time hidden (ProtectProc=invisible, EPERM).
        assert!(!certainly_dead(&holder(|_| {}), &me(), |_| {
            PidProbe::Present { start_time: None }
        }));
        assert!(!certainly_dead(&holder(|_| {}), &me(), |_| {
            PidProbe::Unknown
        }));
        // A holder whose own start time was unknown cannot be told from a reuse.
        assert!(!certainly_dead(
            &holder(|h| h.start_time = None),
            &me(),
            |_| PidProbe::Present {
                start_time: Some(1)
            }
        ));
        // Old-format owners, even naming a pid that does not exist.
        assert!(!certainly_dead("box:200:deadbeef", &me(), absent));
        assert!(!certainly_dead("garbage", &me(), absent));
    }

    #[test]
    fn start_time_is_field_22_whatever_the_command_name() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21";
        assert_eq!(
            parse_start_time(&format!("77 (a) b) c) {tail}")),
            Some(424242)
        );
        assert_eq!(
            parse_start_time(&format!("77 (tokio ) (x)) {tail}")),
            Some(424242)
        );
        assert_eq!(parse_start_time("77 (short) S 1"), None);
        assert_eq!(parse_start_time(""), None);
    }

    #[test]
    fn this_process_is_alive_to_itself() {
        let me = Identity::current();
        assert!(!certainly_dead(&me.owner(3), me, probe));
        assert!(matches!(
            probe(std::process::id()),
            PidProbe::Present { .. }
        ));
    }
}
