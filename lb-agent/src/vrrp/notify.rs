//! Notify scripts, run as keepalived runs them so existing scripts keep working:
//! `notify_master`/`notify_backup`/`notify_fault` as configured, then `notify` with
//! `INSTANCE <name> <STATE> <priority>` appended (state in capitals). One at a time, in the
//! order of the transitions, each bounded by `SCRIPT_TIMEOUT`.

use std::time::Duration;

use tokio::{process::Command, sync::mpsc};

use crate::config::NotifyConfig;

/// A script still running after this long is killed, so a hung script cannot hold back the
/// notifications of later transitions forever.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// A state as notify scripts see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyState {
    Master,
    Backup,
    Fault,
    /// The agent stops (keepalived's notify_stop / STOP).
    Stop,
}

impl NotifyState {
    /// The word keepalived passes.
    pub fn word(self) -> &'static str {
        match self {
            Self::Master => "MASTER",
            Self::Backup => "BACKUP",
            Self::Fault => "FAULT",
            Self::Stop => "STOP",
        }
    }
}

/// The command lines one transition runs, in order.
pub fn commands(
    cfg: &NotifyConfig,
    instance: &str,
    state: NotifyState,
    priority: u8,
) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let specific = match state {
        NotifyState::Master => &cfg.master,
        NotifyState::Backup => &cfg.backup,
        NotifyState::Fault => &cfg.fault,
        NotifyState::Stop => &None,
    };
    if let Some(argv) = specific {
        out.push(argv.clone());
    }
    if let Some(argv) = &cfg.any {
        let mut argv = argv.clone();
        argv.extend([
            "INSTANCE".to_string(),
            instance.to_string(),
            state.word().to_string(),
            priority.to_string(),
        ]);
        out.push(argv);
    }
    out
}

/// Runs the scripts of each queued transition, one script at a time, until the sender is
/// dropped and the queue is empty.
pub async fn run(
    instance: String,
    mut queue: mpsc::UnboundedReceiver<(NotifyState, u8, NotifyConfig)>,
) {
    // Each transition carries the scripts configured when it happened (a reload may change
    // them between two transitions).
    while let Some((state, priority, cfg)) = queue.recv().await {
        for argv in commands(&cfg, &instance, state, priority) {
            run_one(&argv).await;
        }
    }
}

async fn run_one(argv: &[String]) {
    let shown = argv.join(" ");
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            log::warn!("VRRP notify `{shown}`: {e}");
            return;
        }
    };
    match tokio::time::timeout(SCRIPT_TIMEOUT, child.wait()).await {
        Ok(Ok(s)) if s.success() => log::debug!("VRRP notify `{shown}`: ok"),
        Ok(Ok(s)) => log::warn!("VRRP notify `{shown}`: {s}"),
        Ok(Err(e)) => log::warn!("VRRP notify `{shown}`: {e}"),
        Err(_) => {
            log::warn!(
                "VRRP notify `{shown}`: still running after {}s, killed",
                SCRIPT_TIMEOUT.as_secs()
            );
            let _ = child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Option<Vec<String>> {
        Some(s.split(' ').map(str::to_string).collect())
    }

    #[test]
    fn keepalived_arguments_and_order() {
        let cfg = NotifyConfig {
            any: argv("/bin/notify --tag lb"),
            master: argv("/bin/to-master"),
            backup: None,
            fault: argv("/bin/fault VG_1"),
        };
        assert_eq!(
            commands(&cfg, "VI_1", NotifyState::Master, 110),
            vec![
                argv("/bin/to-master").unwrap(),
                argv("/bin/notify --tag lb INSTANCE VI_1 MASTER 110").unwrap(),
            ],
            "the specific script first, then notify with keepalived's four arguments"
        );
        assert_eq!(
            commands(&cfg, "VI_1", NotifyState::Backup, 100),
            vec![argv("/bin/notify --tag lb INSTANCE VI_1 BACKUP 100").unwrap()]
        );
        assert_eq!(
            commands(&cfg, "VI_1", NotifyState::Fault, 0),
            vec![
                argv("/bin/fault VG_1").unwrap(),
                argv("/bin/notify --tag lb INSTANCE VI_1 FAULT 0").unwrap()
            ]
        );
        assert_eq!(
            commands(&cfg, "VI_1", NotifyState::Stop, 110),
            vec![argv("/bin/notify --tag lb INSTANCE VI_1 STOP 110").unwrap()]
        );
        assert!(commands(&NotifyConfig::default(), "VI_1", NotifyState::Master, 1).is_empty());
    }

    #[tokio::test]
    async fn scripts_run_one_at_a_time_in_order() {
        let dir = std::env::temp_dir().join(format!("lb-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let script = dir.join("n.sh");
        // The first call sleeps: a second one running in parallel would write first.
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$3\" = MASTER ] && sleep 0.3\necho \"$*\" >> {}\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let cfg = NotifyConfig {
            any: Some(vec![script.display().to_string()]),
            ..Default::default()
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send((NotifyState::Master, 110, cfg.clone())).unwrap();
        tx.send((NotifyState::Backup, 110, cfg.clone())).unwrap();
        tx.send((NotifyState::Fault, 0, cfg)).unwrap();
        drop(tx);
        run("VI_1".into(), rx).await;
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "INSTANCE VI_1 MASTER 110\nINSTANCE VI_1 BACKUP 110\nINSTANCE VI_1 FAULT 0\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
