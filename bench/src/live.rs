//! Live migration as the command drives it: pre-copy, the switchover decision (`auto` on
//! convergence, `manual` on SIGUSR1 or a line on stdin, both bounded by `--max-precopy`), the
//! vCPU stop, and the `switchover` report (JSON and text).

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde_json::{json, Value};
use vfio_migration::vfio::VfioDevice;
use vfio_multifd::{DeviceStatus, SessionControl, SessionStatus, SourcePhase, SourceReport, Verdict};

use crate::cli::LiveArgs;
use crate::util::{fmt_bytes, fmt_dur, ms, StatusLine};

/// How often the pre-copy loop looks at the session status when nothing wakes it.
const POLL: Duration = Duration::from_millis(20);

/// What ended pre-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// No pre-copy asked for: stop-and-copy as soon as the session is set up.
    Immediate,
    /// `auto`: initial data acknowledged (or sent) and the estimate within the limit.
    Converged,
    /// `auto`: no device streams pre-copy data (none has PRE_COPY), so nothing to wait for.
    NoPrecopyDevice,
    /// `--max-precopy` passed.
    MaxPrecopy,
    /// `manual`: SIGUSR1.
    Signal,
    /// `manual`: a line on stdin.
    Stdin,
}

impl Trigger {
    /// The JSON name.
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Immediate => "immediate",
            Trigger::Converged => "converged",
            Trigger::NoPrecopyDevice => "no-precopy-device",
            Trigger::MaxPrecopy => "max-precopy",
            Trigger::Signal => "sigusr1",
            Trigger::Stdin => "stdin",
        }
    }
}

/// What the switchover waits for in `manual` mode: SIGUSR1 (through a signalfd) or a line on
/// stdin.
///
/// Stdin is a small console, read only while pre-copy runs (so a line written earlier waits
/// in the pipe until the devices are in PRE_COPY), one command per line, in order:
/// * `region-write N REGION OFFSET HEX`: write the bytes `HEX` at `OFFSET` of region `REGION`
///   of the `N`th `--device` (0-based), as the guest's MMIO would while the VM runs (the VM
///   test uses it to change a device's state during pre-copy: the group is this process's
///   alone then); `ok` or the error goes to stderr;
/// * any other line (an empty one, `switchover`): switch over now.
///
/// [`ManualTrigger::new`] blocks SIGUSR1 in the calling thread, and threads inherit the mask,
/// so it must be created before any other thread starts (the session's, the progress bar's):
/// then no thread takes the signal's default action (terminating the process), and it waits
/// in the signalfd until read.
#[derive(Debug)]
pub struct ManualTrigger {
    sfd: SignalFd,
    stdin_open: Cell<bool>,
    /// Bytes of stdin after the last complete line (bounded by [`MAX_LINE`]).
    pending: RefCell<Vec<u8>>,
    /// Second handles on the `--device` devices, by position, for `region-write`.
    devices: RefCell<Vec<Option<VfioDevice>>>,
}

/// Longest console line; a longer one is dropped with an error.
const MAX_LINE: usize = 4096;

impl ManualTrigger {
    /// Blocks SIGUSR1 (see the type's docs) and opens a signalfd for it.
    ///
    /// # Errors
    /// `pthread_sigmask` or `signalfd` failures.
    pub fn new() -> anyhow::Result<ManualTrigger> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGUSR1);
        set.thread_block().map_err(|e| anyhow::anyhow!("blocking SIGUSR1: {e}"))?;
        let sfd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| anyhow::anyhow!("signalfd for SIGUSR1: {e}"))?;
        Ok(ManualTrigger {
            sfd,
            stdin_open: Cell::new(true),
            pending: RefCell::new(Vec::new()),
            devices: RefCell::new(Vec::new()),
        })
    }

    /// Makes `dev` (a second handle, [`VfioDevice::try_clone`]) the target of `region-write
    /// position ...`.
    pub fn add_device(&self, position: usize, dev: VfioDevice) {
        let mut d = self.devices.borrow_mut();
        if d.len() <= position {
            d.resize_with(position + 1, || None);
        }
        d[position] = Some(dev);
    }

    /// Waits at most `timeout` for SIGUSR1, a line on stdin or `wake` (the session's event fd).
    /// Returns the trigger, if one came. Stdin at EOF (or failing) is not a line: it is
    /// ignored from then on.
    fn wait(&self, timeout: Duration, wake: BorrowedFd<'_>) -> Option<Trigger> {
        if self.next_command() {
            return Some(Trigger::Stdin);
        }
        let stdin = std::io::stdin();
        let mut fds = vec![PollFd::new(self.sfd.as_fd(), PollFlags::POLLIN), PollFd::new(wake, PollFlags::POLLIN)];
        if self.stdin_open.get() {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        if poll(&mut fds, t).unwrap_or(0) <= 0 {
            return None;
        }
        let ready = |i: usize| fds.get(i).and_then(PollFd::revents).is_some_and(|r| !r.is_empty());
        if ready(0) && matches!(self.sfd.read_signal(), Ok(Some(_))) {
            return Some(Trigger::Signal);
        }
        if ready(2) {
            let mut buf = [0u8; 4096];
            match nix::unistd::read(stdin.as_fd(), &mut buf) {
                Ok(0) | Err(_) => self.stdin_open.set(false),
                Ok(n) => self.pending.borrow_mut().extend_from_slice(&buf[..n]),
            }
            if self.next_command() {
                return Some(Trigger::Stdin);
            }
        }
        None
    }

    /// Runs the complete lines read so far, up to a switchover command (true; the lines after
    /// it stay unread).
    fn next_command(&self) -> bool {
        loop {
            let line = {
                let mut p = self.pending.borrow_mut();
                let Some(end) = p.iter().position(|&b| b == b'\n') else {
                    if p.len() > MAX_LINE {
                        eprintln!("vfio-multifd: console: a line longer than {MAX_LINE} bytes was dropped");
                        p.clear();
                    }
                    return false;
                };
                let line: Vec<u8> = p.drain(..=end).collect();
                String::from_utf8_lossy(&line).trim().to_owned()
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["region-write", n, region, offset, hex] => match self.region_write(n, region, offset, hex) {
                    Ok(()) => eprintln!("vfio-multifd: console: region-write ok"),
                    Err(e) => eprintln!("vfio-multifd: console: {line:?}: {e:#}"),
                },
                ["region-write", ..] => {
                    eprintln!("vfio-multifd: console: {line:?}: expected `region-write N REGION OFFSET HEX`");
                }
                _ => return true,
            }
        }
    }

    fn region_write(&self, n: &str, region: &str, offset: &str, hex: &str) -> anyhow::Result<()> {
        let n: usize = n.parse().map_err(|_| anyhow::anyhow!("device position {n:?} is not a number"))?;
        let region: u32 = region.parse().map_err(|_| anyhow::anyhow!("region {region:?} is not a number"))?;
        let offset = crate::cli::parse_u64_auto(offset).map_err(|e| anyhow::anyhow!("offset: {e}"))?;
        let bytes = crate::cli::parse_hex_bytes(hex).map_err(|e| anyhow::anyhow!("{e}"))?;
        let devs = self.devices.borrow();
        let dev = devs
            .get(n)
            .and_then(Option::as_ref)
            .ok_or_else(|| anyhow::anyhow!("no --device at position {n} (positions count from 0)"))?;
        dev.region_write(region, offset, &bytes)?;
        Ok(())
    }
}

/// How the command drives a session (`manual` mode is a [`ManualTrigger`] given to [`drive`]).
#[derive(Debug, Clone, Copy)]
pub struct DriveOpts {
    /// Pre-copy first (else switch over at once).
    pub precopy: bool,
    /// `auto`'s limit on the estimated switchover time.
    pub downtime_limit: Duration,
    /// Longest pre-copy.
    pub max_precopy: Duration,
    /// A wait between the switchover decision and the vCPU stop (zero for the command). The
    /// benchmark's fixed-cost variant waits so that no pre-copy data is still in flight or
    /// being loaded at the destination when it measures a switchover that moves none.
    pub settle: Duration,
}

impl Default for DriveOpts {
    fn default() -> Self {
        DriveOpts {
            precopy: false,
            downtime_limit: Duration::from_millis(300),
            max_precopy: Duration::from_secs(60),
            settle: Duration::ZERO,
        }
    }
}

impl From<&LiveArgs> for DriveOpts {
    fn from(a: &LiveArgs) -> Self {
        DriveOpts {
            precopy: a.precopy,
            downtime_limit: a.downtime_limit,
            max_precopy: a.max_precopy,
            settle: Duration::ZERO,
        }
    }
}

/// What the drive saw up to the switchover.
#[derive(Debug, Clone)]
pub struct Switched {
    /// What ended pre-copy.
    pub trigger: Trigger,
    /// From `start_precopy` returning to the decision.
    pub precopy_time: Duration,
    /// Stopping the vCPUs (the guest and DMA threads of `loopback --peer-dma`).
    pub vcpu_stop: Duration,
    /// Just before `switchover()`: the source devices stop from here on.
    pub stopped_at: Instant,
    /// `switchover()` itself: every device quiesced, then every device in STOP_COPY.
    pub switchover_call: Duration,
    /// The session's status just before `switchover()`.
    pub status: SessionStatus,
}

/// Drives a session: pre-copy (when asked) until the switchover is decided, then the vCPU stop
/// and the switchover. Updates `line` with the pre-copy state for the progress bar.
///
/// # Errors
/// The session's errors; [`vfio_multifd::Error::Aborted`] when a device failed in pre-copy
/// (the session's result then carries the device's own error).
pub fn drive(
    ctl: &mut SessionControl<'_>,
    o: &DriveOpts,
    manual: Option<&ManualTrigger>,
    line: &StatusLine,
    stop_vcpus: &mut dyn FnMut(),
) -> vfio_multifd::Result<Switched> {
    let (trigger, precopy_time) = if o.precopy {
        ctl.start_precopy()?;
        let t0 = Instant::now();
        let trigger = precopy(ctl, o, manual, line, t0)?;
        (trigger, t0.elapsed())
    } else {
        (Trigger::Immediate, Duration::ZERO)
    };
    if !o.settle.is_zero() {
        std::thread::sleep(o.settle);
    }
    line.set("  stopping the vCPUs".into());
    let t = Instant::now();
    stop_vcpus();
    let vcpu_stop = t.elapsed();
    line.set("  switching over".into());
    let status = ctl.status();
    let stopped_at = Instant::now();
    ctl.switchover()?;
    let switchover_call = stopped_at.elapsed();
    line.set("  stop-copy: the rest of the state and the configs".into());
    Ok(Switched { trigger, precopy_time, vcpu_stop, stopped_at, switchover_call, status })
}

/// The pre-copy loop: returns what ended it.
fn precopy(
    ctl: &SessionControl<'_>,
    o: &DriveOpts,
    manual: Option<&ManualTrigger>,
    line: &StatusLine,
    t0: Instant,
) -> vfio_multifd::Result<Trigger> {
    loop {
        let st = ctl.status();
        if st.devices.iter().any(|d| d.phase == SourcePhase::Failed) {
            return Err(vfio_multifd::Error::Aborted);
        }
        line.set(status_line(&st, t0.elapsed()));
        if manual.is_none() {
            if st.devices.iter().all(|d| !d.precopy) {
                return Ok(Trigger::NoPrecopyDevice);
            }
            if st.converged(o.downtime_limit) {
                return Ok(Trigger::Converged);
            }
        }
        let left = o.max_precopy.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return Ok(Trigger::MaxPrecopy);
        }
        match manual {
            Some(m) => {
                if let Some(t) = m.wait(POLL.min(left), ctl.event_fd()) {
                    return Ok(t);
                }
            }
            None => {
                let _ = ctl.next_event(POLL.min(left));
            }
        }
        // Events only wake this loop up; the status says everything they say.
        while ctl.next_event(Duration::ZERO).is_some() {}
    }
}

/// The progress bar's pre-copy status: the time and estimated switchover, then a line per
/// device (up to 4, else one summary line) with its phase, initial and dirty bytes left, bytes
/// sent in pre-copy and whether its initial data is sent or acknowledged.
fn status_line(st: &SessionStatus, elapsed: Duration) -> String {
    let ack = |d: &DeviceStatus| {
        if !d.precopy {
            "-"
        } else if d.initial_data_acked {
            "acked"
        } else if d.initial_data_sent {
            "sent"
        } else {
            "initial"
        }
    };
    let devs: Vec<String> = if st.devices.len() <= 4 {
        st.devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                format!(
                    "#{i} {} init {} dirty {} sent {} {}",
                    phase_name(d.phase),
                    short(d.initial_bytes),
                    short(d.dirty_bytes),
                    short(d.precopy_bytes),
                    ack(d)
                )
            })
            .collect()
    } else {
        let acked = st.devices.iter().filter(|d| d.precopy && d.initial_data_acked).count();
        let pre = st.devices.iter().filter(|d| d.precopy).count();
        let init: u64 = st.devices.iter().map(|d| d.initial_bytes).sum();
        let dirty: u64 = st.devices.iter().map(|d| d.dirty_bytes).sum();
        vec![format!("{} devices, {acked}/{pre} acked, init {} dirty {}", st.devices.len(), short(init), short(dirty))]
    };
    let est = st.estimated_switchover.map_or_else(|| "?".to_owned(), fmt_dur);
    format!("  pre-copy {:.1}s, switchover est. {est}\n  {}", elapsed.as_secs_f64(), devs.join("\n  "))
}

/// Bytes in at most 6 characters: `512B`, `4.0K`, `591K`, `54.0M`, `1.5G`.
fn short(b: u64) -> String {
    const U: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || v >= 100.0 {
        format!("{v:.0}{}", U[i])
    } else {
        format!("{v:.1}{}", U[i])
    }
}

fn phase_name(p: SourcePhase) -> &'static str {
    match p {
        SourcePhase::Prepared => "prepared",
        SourcePhase::PreCopy => "pre-copy",
        SourcePhase::Quiesced => "quiesced",
        SourcePhase::StopCopy => "stop-copy",
        SourcePhase::Done => "done",
        SourcePhase::Failed => "failed",
        _ => "?",
    }
}

/// Where the downtime of a run was measured to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DowntimeEnd {
    /// `loopback`: every destination device loaded, validated and RUNNING (the receiver's
    /// `on_started` hook, where a VMM resumes its vCPUs; the receiver's teardown follows).
    DestinationRunning,
    /// `send` with a return path: the destination's last message arrived (and the commit was
    /// sent), which it sends once its devices are loaded and validated
    /// (`SourceReport::verdicts_at`); the close's wait for its EOF afterwards is not included.
    DestinationVerdict,
    /// `send` without a verdict: every device sent its last packet (`SourceReport::sent_at`);
    /// the destination's share is not included, nor the close's wait for its EOF.
    SourceDone,
}

impl DowntimeEnd {
    fn name(self) -> &'static str {
        match self {
            DowntimeEnd::DestinationRunning => "destination_running",
            DowntimeEnd::DestinationVerdict => "destination_verdict",
            DowntimeEnd::SourceDone => "source_done",
        }
    }

    fn words(self) -> &'static str {
        match self {
            DowntimeEnd::DestinationRunning => {
                "source devices stopped -> destination devices loaded, validated, RUNNING"
            }
            DowntimeEnd::DestinationVerdict => {
                "source devices stopped -> the destination's verdict (its devices loaded, validated, started)"
            }
            DowntimeEnd::SourceDone => "source devices stopped -> last byte sent (destination not included)",
        }
    }
}

/// The `end.switchover` object of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The drive's facts.
    pub sw: Switched,
    /// The drive's options.
    pub opts: DriveOpts,
    /// The downtime.
    pub downtime: Duration,
    /// Where it was measured to.
    pub end: DowntimeEnd,
    /// `loopback`: from the same start to the receiver's return (its teardown included).
    pub to_receiver_return: Option<Duration>,
    /// Device bytes read in PRE_COPY (engine report, all devices).
    pub precopy_bytes: u64,
    /// Device bytes sent after `switchover()` was called.
    pub switchover_bytes: u64,
    /// The destination's verdicts (`None`: it gave none).
    pub verdicts: Option<Vec<(vfio_multifd::DeviceId, Verdict)>>,
}

impl Summary {
    /// The summary of a successful run, the session's report and the moment the downtime ended.
    pub fn new(sw: Switched, opts: DriveOpts, rep: &SourceReport, ended: Instant, end: DowntimeEnd) -> Summary {
        let sent_before = sw.status.sent_bytes;
        Summary {
            downtime: ended.saturating_duration_since(sw.stopped_at),
            precopy_bytes: rep.precopy_bytes(),
            switchover_bytes: rep.data_bytes().saturating_sub(sent_before),
            verdicts: rep.verdicts.clone(),
            sw,
            opts,
            end,
            to_receiver_return: None,
        }
    }

    /// Whether every pre-copy device's initial data was acknowledged by the destination at the
    /// switchover (false without a return path).
    pub fn acked(&self) -> bool {
        let st = &self.sw.status;
        st.return_path && st.devices.iter().all(|d| !d.precopy || d.initial_data_acked)
    }

    /// Pre-copy rounds: the most any device made.
    pub fn rounds(&self) -> u64 {
        self.sw.status.devices.iter().map(|d| d.precopy_rounds).max().unwrap_or(0)
    }

    /// `loaded`, `failed: ...` or `none`.
    pub fn verdict(&self) -> String {
        verdict_text(self.verdicts.as_deref())
    }

    /// The `end.switchover` JSON object.
    pub fn json(&self) -> Value {
        let st = &self.sw.status;
        let verdict_of = |id: &vfio_multifd::DeviceId| {
            self.verdicts.as_ref().and_then(|v| v.iter().find(|(d, _)| d == id)).map(|(_, v)| verdict_one(v))
        };
        json!({
            "mode": if self.opts.precopy { "precopy" } else { "stop-copy" },
            "trigger": self.sw.trigger.name(),
            "downtime_ms": ms(self.downtime),
            "downtime_measured_to": self.end.name(),
            "receiver_returned_ms": self.to_receiver_return.map(ms),
            "switchover_call_ms": ms(self.sw.switchover_call),
            "vcpu_stop_ms": ms(self.sw.vcpu_stop),
            "precopy_seconds": self.sw.precopy_time.as_secs_f64(),
            "precopy_bytes": self.precopy_bytes,
            "switchover_bytes": self.switchover_bytes,
            "precopy_rounds": self.rounds(),
            "acked": self.acked(),
            "return_path": st.return_path,
            "verdict": self.verdict(),
            "downtime_limit_ms": ms(self.opts.downtime_limit),
            "max_precopy_seconds": self.opts.max_precopy.as_secs_f64(),
            "estimated_switchover_ms": st.estimated_switchover.map(ms),
            "remaining_bytes": st.remaining_bytes,
            "rate_bytes_per_sec": st.rate_bytes_per_sec,
            "devices": st.devices.iter().map(|d| json!({
                "idstr": d.id.idstr(), "instance_id": d.id.instance_id, "precopy": d.precopy,
                "precopy_bytes": d.precopy_bytes, "precopy_rounds": d.precopy_rounds,
                "initial_data_sent": d.initial_data_sent, "initial_data_acked": d.initial_data_acked,
                "verdict": verdict_of(&d.id).unwrap_or_else(|| "none".into()),
            })).collect::<Vec<_>>(),
        })
    }

    /// The same in words.
    pub fn print_text(&self) {
        let st = &self.sw.status;
        if self.opts.precopy {
            let why = match self.sw.trigger {
                Trigger::Converged => format!(
                    "converged (estimated switchover {} <= limit {})",
                    st.estimated_switchover.map_or_else(|| "?".into(), fmt_dur),
                    fmt_dur(self.opts.downtime_limit)
                ),
                Trigger::MaxPrecopy => format!(
                    "--max-precopy {} reached (estimated switchover {}, limit {})",
                    fmt_dur(self.opts.max_precopy),
                    st.estimated_switchover.map_or_else(|| "unknown".into(), fmt_dur),
                    fmt_dur(self.opts.downtime_limit)
                ),
                Trigger::Signal => "SIGUSR1".into(),
                Trigger::Stdin => "a line on stdin".into(),
                Trigger::NoPrecopyDevice => "no device has pre-copy data".into(),
                Trigger::Immediate => "immediately".into(),
            };
            println!(
                "switchover: after {:.3} s of pre-copy ({} round(s) at most per device), on {why}",
                self.sw.precopy_time.as_secs_f64(),
                self.rounds()
            );
            let pre = st.devices.iter().filter(|d| d.precopy).count();
            println!(
                "  initial data acknowledged by the destination: {}",
                if self.acked() {
                    format!("yes ({pre} pre-copy device(s))")
                } else if st.return_path {
                    "no (switched over before every acknowledgement)".into()
                } else {
                    "no (no return path)".into()
                }
            );
        } else {
            println!("switchover: stop-and-copy (no pre-copy)");
        }
        println!(
            "  moved: {} in pre-copy (VM running), {} after the switchover started",
            fmt_bytes(self.precopy_bytes),
            fmt_bytes(self.switchover_bytes)
        );
        println!(
            "  downtime: {} ({}); switchover call {}, vCPU stop {}",
            fmt_dur(self.downtime),
            self.end.words(),
            fmt_dur(self.sw.switchover_call),
            fmt_dur(self.sw.vcpu_stop)
        );
        match self.verdict().as_str() {
            "none" => println!(
                "  destination verdict: none (the destination gave no verdict: a QEMU-format peer or the return path is off)"
            ),
            v => println!("  destination verdict: {v}"),
        }
    }
}

fn verdict_one(v: &Verdict) -> String {
    match v {
        Verdict::Loaded => "loaded".into(),
        Verdict::Failed { what } => format!("failed: {what}"),
        _ => "unknown".into(),
    }
}

/// `failed: DEVICE: what`, without naming the device twice (the destination's error text
/// usually names it already).
pub fn failed_text(device: &vfio_multifd::DeviceId, what: &str) -> String {
    if what.contains(&device.to_string()) {
        format!("failed: {what}")
    } else {
        format!("failed: {device}: {what}")
    }
}

/// `loaded` (every device), `failed: DEVICE: what` (the first that failed), or `none`.
pub fn verdict_text(v: Option<&[(vfio_multifd::DeviceId, Verdict)]>) -> String {
    let Some(list) = v else { return "none".into() };
    for (d, v) in list {
        match v {
            Verdict::Loaded => {}
            Verdict::Failed { what } => return failed_text(d, what),
            _ => return format!("unknown verdict for {d}"),
        }
    }
    "loaded".into()
}
