//! A graceful stop in phases: draining (no new tasks; running ones may
//! finish until the deadline, then they are interrupted), flushing (end
//! reports go out until acknowledged or a timeout), done; then the daemon
//! closes its stream and deregisters.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tonic::Streaming;
use tracing::{debug, info, warn};

use super::{Session, TaskRecord};
use crate::pb::session_response::Message as Down;
use crate::pb::{DeregisterRequest, SessionRequest, SessionResponse};
use crate::runner::{Control, send_control};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Running,
    /// Shutdown began: no new tasks; running ones may finish until
    /// `interrupt_at`, then they are interrupted.
    Draining {
        interrupt_at: Instant,
        interrupted: bool,
    },
    /// No agent runs any more; end reports may be acknowledged until `until`.
    Flushing {
        until: Instant,
    },
    Done,
}

/// On shutdown, how long end reports may take to be acknowledged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// On shutdown, how long the server may take to close the stream after us.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(5);

impl Session {
    /// Ends the request stream and lets the server finish its side, so what
    /// was queued last is not cut off.
    pub(super) async fn close(
        &mut self,
        tx: mpsc::Sender<SessionRequest>,
        mut inbound: Streaming<SessionResponse>,
    ) {
        drop(tx);
        let drain = async {
            while let Ok(Some(resp)) = inbound.message().await {
                if let Some(Down::Command(cmd)) = resp.message {
                    debug!(command_id = %cmd.id, "command after shutdown left for redelivery");
                }
            }
        };
        let _ = timeout(CLOSE_TIMEOUT, drain).await;
    }

    pub(super) async fn deregister(&mut self) {
        let Some(daemon_id) = self.daemon_id.clone() else {
            return;
        };
        let Some((_, mut client)) = self.server.clone() else {
            return;
        };
        let call = client.deregister(DeregisterRequest {
            daemon_id: daemon_id.clone(),
        });
        match timeout(DEREGISTER_TIMEOUT, call).await {
            Ok(Ok(_)) => info!(%daemon_id, "deregistered"),
            Ok(Err(s)) => {
                warn!(%daemon_id, code = ?s.code(), message = s.message(), "Deregister failed")
            }
            Err(_) => warn!(%daemon_id, "Deregister timed out"),
        }
    }

    pub(super) fn begin_shutdown(&mut self) {
        self.shutdown_seen = true;
        if self.phase == Phase::Running {
            let live = self.running_task_ids().len();
            info!(
                running_tasks = live,
                wait = ?self.cfg.shutdown_grace,
                "shutting down: no new tasks; running ones may finish"
            );
            self.phase = Phase::Draining {
                interrupt_at: Instant::now() + self.cfg.shutdown_grace,
                interrupted: false,
            };
        }
    }

    /// A stop request: the first begins the graceful stop, the next one
    /// interrupts running tasks now. `false`: no more will come.
    pub(super) fn on_stop(&mut self, requested: bool) {
        if !requested {
            self.stops_open = false;
        } else if !self.shutdown_seen {
            self.begin_shutdown();
        } else if matches!(
            self.phase,
            Phase::Draining {
                interrupted: false,
                ..
            }
        ) {
            info!("asked again to stop: interrupting running tasks now");
            self.interrupt_all();
        }
    }

    /// Interrupts every running task for the shutdown; their ends ask the
    /// server to queue them again.
    fn interrupt_all(&mut self) {
        for (id, rec) in self.tasks.iter_mut() {
            if let Some(control) = &rec.control {
                debug!(task_id = %id, "interrupting");
                rec.cut_by_shutdown = true;
                send_control(
                    control,
                    Control::Interrupt {
                        grace: Duration::ZERO,
                    },
                );
            }
        }
        if let Phase::Draining { interrupt_at, .. } = self.phase {
            self.phase = Phase::Draining {
                interrupt_at,
                interrupted: true,
            };
        }
    }

    pub(super) fn phase_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Draining {
                interrupt_at,
                interrupted: false,
            } => Some(interrupt_at),
            Phase::Flushing { until } => Some(until),
            _ => None,
        }
    }

    pub(super) fn on_phase_deadline(&mut self) {
        match self.phase {
            Phase::Draining {
                interrupted: false, ..
            } => {
                info!("shutdown wait is over; interrupting running tasks");
                self.interrupt_all();
            }
            Phase::Flushing { .. } => {
                warn!("end reports not all acknowledged in time; stopping anyway");
                self.phase = Phase::Done;
            }
            _ => {}
        }
    }

    pub(super) fn update_phase(&mut self) {
        if matches!(self.phase, Phase::Draining { .. })
            && !self.tasks.values().any(TaskRecord::is_live)
        {
            debug!("no agent runs any more; flushing end reports");
            self.phase = Phase::Flushing {
                until: Instant::now() + FLUSH_TIMEOUT,
            };
        }
        if matches!(self.phase, Phase::Flushing { .. })
            && self.tasks.is_empty()
            && self.control_out.is_empty()
        {
            self.phase = Phase::Done;
        }
    }

    /// Kills every agent at once: the server will not take this daemon
    /// back, so nothing they do could be reported.
    pub(super) fn abandon(&mut self) {
        for rec in self.tasks.values() {
            if let Some(control) = &rec.control {
                send_control(control, Control::Kill);
            }
        }
    }
}
