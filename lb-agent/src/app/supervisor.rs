//! Supervision of the agent's long-running tasks: any of them ending, for whatever reason,
//! while the agent is not stopping is a failure the agent must not survive silently.

use std::{collections::HashMap, future::Future};

use tokio::task::{Id, JoinSet};

/// How a supervised task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The task's name ("vrrp", "keeper", "prober kube-apiserver/master01"...).
    pub name: String,
    /// "returned", "failed: ..." or "panicked: ...".
    pub how: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task {} {}", self.name, self.how)
    }
}

/// A set of named tasks.
#[derive(Default)]
pub struct Supervisor {
    set: JoinSet<Result<(), String>>,
    names: HashMap<Id, String>,
}

impl Supervisor {
    /// Spawns `fut` as a supervised task called `name`.
    pub fn spawn<F>(&mut self, name: impl Into<String>, fut: F)
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let h = self.set.spawn(fut);
        self.names.insert(h.id(), name.into());
    }

    /// Waits until some task ends and says how; None when no task is left.
    pub async fn next_exit(&mut self) -> Option<Exit> {
        let r = self.set.join_next_with_id().await?;
        let (id, how) = match r {
            Ok((id, Ok(()))) => (id, "returned".to_string()),
            Ok((id, Err(e))) => (id, format!("failed: {e}")),
            Err(e) => {
                let id = e.id();
                let how = if e.is_panic() {
                    let p = e.into_panic();
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".into());
                    format!("panicked: {msg}")
                } else {
                    "was cancelled".to_string()
                };
                (id, how)
            }
        };
        let name = self.names.remove(&id).unwrap_or_else(|| "?".into());
        Some(Exit { name, how })
    }

    /// Waits up to `timeout` for every task to end, then aborts the rest; returns the
    /// names of the tasks that had to be aborted.
    pub async fn finish(mut self, timeout: std::time::Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.set.is_empty() {
            match tokio::time::timeout_at(deadline, self.next_exit()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    let left: Vec<String> = self.names.values().cloned().collect();
                    self.set.abort_all();
                    return left;
                }
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_how_each_task_ended() {
        let mut s = Supervisor::default();
        s.spawn("fails", async { Err("boom".to_string()) });
        let e = s.next_exit().await.unwrap();
        assert_eq!(e.to_string(), "task fails failed: boom");
        s.spawn("panics", async { panic!("at the disco") });
        let e = s.next_exit().await.unwrap();
        assert_eq!(
            (e.name.as_str(), e.how.as_str()),
            ("panics", "panicked: at the disco")
        );
        s.spawn("returns", async { Ok(()) });
        assert_eq!(s.next_exit().await.unwrap().how, "returned");
        assert!(s.next_exit().await.is_none());
        s.spawn("hangs", std::future::pending());
        assert_eq!(
            s.finish(std::time::Duration::from_millis(10)).await,
            vec!["hangs".to_string()]
        );
    }
}
