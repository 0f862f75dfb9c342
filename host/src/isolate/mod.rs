//! Isolated drivers: a plugin's connections live in a child process that speaks capvirt's one
//! RPC protocol ([`capvirt_rpc`]) over a socket pair, so a driver that segfaults, aborts or
//! hangs costs one call, not the host.
//!
//! The dispatch path (registry → policy → validation → audit) stays in the host: the child
//! only ever receives calls the host granted and validated, through
//! [`crate::driver::DriverHandle::invoke`]. The child is the `capvirt` binary itself
//! (`capvirt driver-child PLUGIN`, see [`child`]), which loads the plugin with the same loader
//! checks as the host. A child that died or was stopped is started again at the next call.

pub mod child;

use std::{
    cell::Cell,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use capvirt_plugin_api::{ErrorKind, PluginError, Value};
use capvirt_rpc::{Client, ClientError, Hello, Update};

use crate::driver::CallObserver;

/// How isolated drivers are run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// The program started as the child: a `capvirt` binary (`capvirt driver-child PLUGIN`).
    pub program: PathBuf,
    /// A call during which the child reports nothing (no result, progress or event) for this
    /// long is abandoned: the child is stopped and the call fails with a timeout.
    pub idle_timeout: Duration,
}

impl Isolation {
    /// The default bound on a silent call: longer than any driver operation that reports no
    /// progress (a QEMU start under load, a guest shutdown with its own timeout).
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

    /// Children are this very program.
    pub fn this_program() -> std::io::Result<Isolation> {
        Ok(Isolation { program: std::env::current_exe()?, idle_timeout: Isolation::DEFAULT_IDLE_TIMEOUT })
    }
}

/// How often a waiting call looks at the caller's cancellation and the idle bound.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);
/// How long a child that broke its connection is given to finish dying before it is killed.
const REAP_GRACE: Duration = Duration::from_secs(2);
/// The largest message between host and child (as the daemon's).
const MAX_MESSAGE_BYTES: usize = capvirt_rpc::DEFAULT_MAX_MESSAGE_BYTES;

/// One connection of one plugin, served by a child process.
pub(crate) struct IsolatedDriver {
    plugin: String,
    path: PathBuf,
    pin: Option<String>,
    uri: String,
    readonly: bool,
    /// The connect options the host gives every driver (read-only, image allow-list…).
    options: Value,
    settings: Isolation,
    /// `None` only while dropping: the connection's tasks live in it, and dropping it closes
    /// the socket, which ends a healthy child at once.
    runtime: Option<tokio::runtime::Runtime>,
    child: Mutex<ChildSlot>,
}

#[derive(Default)]
struct ChildSlot {
    running: Option<Running>,
    /// Bumped at every start, so a failed call only reaps the child it talked to.
    generation: u64,
}

struct Running {
    process: Child,
    client: Client,
}

/// How a call to the child ended without an answer.
enum Lost {
    /// The connection broke: the child died (or closed it).
    Broken(ClientError),
    /// Nothing came back within the idle bound.
    Silent,
    /// The caller cancelled; the call was abandoned (the child sees it cancelled).
    Cancelled,
}

impl IsolatedDriver {
    /// Starts the child for `plugin` and opens its connection to `uri` with the host's connect
    /// `options` (a URI the driver refuses is reported here, as in process). Every restarted
    /// child opens it again the same way.
    pub(crate) fn start(
        plugin: &str,
        path: &Path,
        pin: Option<&str>,
        uri: &str,
        options: Value,
        settings: &Isolation,
    ) -> Result<IsolatedDriver, PluginError> {
        let readonly = options.get("readonly").and_then(Value::as_bool).unwrap_or(false);
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().map_err(|e| {
                PluginError::new(ErrorKind::DriverFailure, format!("cannot start an async runtime: {e}"))
            })?;
        let driver = IsolatedDriver {
            plugin: plugin.to_string(),
            path: path.to_path_buf(),
            pin: pin.map(String::from),
            uri: uri.to_string(),
            readonly,
            options,
            settings: settings.clone(),
            runtime: Some(runtime),
            child: Mutex::new(ChildSlot::default()),
        };
        driver.client()?;
        Ok(driver)
    }

    /// Performs `capability` in the child. Progress and events reach `observer`; a crash or
    /// silence becomes an error naming the plugin and the capability.
    pub(crate) fn invoke(
        &self,
        capability: &str,
        args: &Value,
        observer: &dyn CallObserver,
    ) -> Result<Value, PluginError> {
        let (client, generation) = self.client()?;
        let outcome = self.runtime()?.block_on(self.watched_call(&client, capability, args, observer));
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(failure)) => Err(failure
                .driver_error()
                .unwrap_or_else(|| PluginError::new(ErrorKind::DriverFailure, failure.message))),
            Err(Lost::Broken(error)) => {
                let how = self.reap(generation, false);
                Err(PluginError::new(
                    ErrorKind::DriverFailure,
                    format!(
                        "driver plugin `{}` ({}) crashed during `{capability}`: {}; it is restarted at the next call",
                        self.plugin,
                        self.path.display(),
                        how.unwrap_or_else(|| format!("its connection broke ({error})")),
                    ),
                ))
            }
            Err(Lost::Silent) => {
                self.reap(generation, true);
                Err(PluginError::new(
                    ErrorKind::Timeout,
                    format!(
                        "driver plugin `{}` ({}) did not answer `{capability}` within {} s; its process was stopped and is restarted at the next call",
                        self.plugin,
                        self.path.display(),
                        self.settings.idle_timeout.as_secs_f64()
                    ),
                ))
            }
            Err(Lost::Cancelled) => Err(PluginError::new(
                ErrorKind::DriverFailure,
                format!("`{capability}` was cancelled by the caller before driver plugin `{}` answered", self.plugin),
            )),
        }
    }

    /// The call, abandoned when the child stays silent past the idle bound or the caller
    /// cancels (dropping the call cancels it in the child).
    async fn watched_call(
        &self,
        client: &Client,
        capability: &str,
        args: &Value,
        observer: &dyn CallObserver,
    ) -> Result<Result<Value, capvirt_rpc::CallFailure>, Lost> {
        let last_heard = Cell::new(Instant::now());
        let call = client.call(&self.uri, self.readonly, capability, args, |update| {
            last_heard.set(Instant::now());
            match update {
                Update::Progress { done, total } => observer.progress(done, total),
                Update::Event { name, data } => observer.event(&name, &data),
            }
        });
        let mut call = std::pin::pin!(call);
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tokio::select! {
                outcome = &mut call => return outcome.map_err(Lost::Broken),
                _ = tick.tick() => {
                    if observer.is_cancelled() {
                        return Err(Lost::Cancelled);
                    }
                    if last_heard.get().elapsed() >= self.settings.idle_timeout {
                        return Err(Lost::Silent);
                    }
                }
            }
        }
    }

    /// A client of the running child, starting one when there is none (or it died).
    fn client(&self) -> Result<(Client, u64), PluginError> {
        let mut slot = self.slot();
        if let Some(running) = slot.running.as_mut() {
            if matches!(running.process.try_wait(), Ok(None)) {
                return Ok((running.client.clone(), slot.generation));
            }
        }
        if let Some(mut dead) = slot.running.take() {
            let _ = dead.process.wait();
        }
        let running = self.spawn()?;
        let client = running.client.clone();
        slot.generation += 1;
        slot.running = Some(running);
        Ok((client, slot.generation))
    }

    fn spawn(&self) -> Result<Running, PluginError> {
        let failed = |what: String| {
            PluginError::new(
                ErrorKind::DriverFailure,
                format!("cannot start the isolated driver process for plugin `{}`: {what}", self.plugin),
            )
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| failed(format!("socket pair: {e}")))?;
        let mut command = Command::new(&self.settings.program);
        command.arg("driver-child").arg(&self.path);
        if let Some(pin) = &self.pin {
            command.arg("--pin").arg(pin);
        }
        // The child's end of the socket pair is its standard input.
        command.stdin(Stdio::from(OwnedFd::from(theirs))).stdout(Stdio::null()).stderr(Stdio::inherit());
        let mut process = command.spawn().map_err(|e| failed(format!("{}: {e}", self.settings.program.display())))?;
        let connected = self.runtime()?.block_on(async {
            ours.set_nonblocking(true)?;
            let stream = tokio::net::UnixStream::from_std(ours)?;
            let hello = Hello::new(String::new(), Vec::new(), format!("capvirt {}", env!("CARGO_PKG_VERSION")));
            let client = Client::over_stream(stream, &self.path, hello, MAX_MESSAGE_BYTES)
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let opened = client
                .connect(&self.uri, self.readonly, Some(&self.options))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()));
            Ok::<_, std::io::Error>((client, opened?))
        });
        match connected {
            Ok((client, Ok(_))) => Ok(Running { process, client }),
            Ok((_, Err(refusal))) => {
                stop(&mut process, REAP_GRACE);
                Err(refusal
                    .driver_error()
                    .unwrap_or_else(|| PluginError::new(ErrorKind::DriverFailure, refusal.message)))
            }
            Err(error) => {
                let how = stop(&mut process, REAP_GRACE);
                Err(failed(describe_exit(how).unwrap_or_else(|| error.to_string())))
            }
        }
    }

    /// Takes the child of `generation` out of service: waits for it to die (killing it when
    /// `kill` or when it lingers) and says how it ended.
    fn reap(&self, generation: u64, kill: bool) -> Option<String> {
        let mut slot = self.slot();
        if slot.generation != generation {
            return None;
        }
        let mut running = slot.running.take()?;
        drop(slot);
        if kill {
            let _ = running.process.kill();
        }
        describe_exit(stop(&mut running.process, REAP_GRACE))
    }

    fn runtime(&self) -> Result<&tokio::runtime::Runtime, PluginError> {
        self.runtime.as_ref().ok_or_else(|| PluginError::internal("the isolated driver is shutting down"))
    }

    fn slot(&self) -> MutexGuard<'_, ChildSlot> {
        // A panic while holding the slot leaves it consistent (fields are replaced whole).
        self.child.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for IsolatedDriver {
    fn drop(&mut self) {
        let running = self.slot().running.take();
        if let Some(Running { mut process, client }) = running {
            // Closing the connection (its tasks live in the runtime) ends a healthy child; a
            // stuck one is killed.
            drop(client);
            drop(self.runtime.take());
            stop(&mut process, Duration::from_millis(500));
        }
    }
}

/// Waits up to `grace` for `process` to exit, then kills it; its exit status when known.
fn stop(process: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        match process.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if started.elapsed() < grace => std::thread::sleep(Duration::from_millis(1)),
            Ok(None) => {
                let _ = process.kill();
                return process.wait().ok();
            }
            Err(_) => return None,
        }
    }
}

/// "killed by signal SIGSEGV", "exited with status 3".
fn describe_exit(status: Option<ExitStatus>) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    let status = status?;
    if let Some(signal) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(signal).map(|s| s.as_str()).unwrap_or("unknown");
        let core = if status.core_dumped() { ", core dumped" } else { "" };
        return Some(format!("its process was killed by signal {signal} ({name}{core})"));
    }
    status.code().map(|code| format!("its process exited with status {code}"))
}
