//! Shared helpers: size parsing and formatting, CPU accounting, the progress bar and interval
//! sampler, and fio/iperf3-style JSON fragments.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use vfio_multifd::{LatencySummary, Progress};

/// Parses a byte size: plain bytes (`4096`), or a number with a unit. `K`, `M`, `G`, `T` and
/// their `KiB`, `MiB`... forms are binary (as in fio and iperf3); `KB`, `MB`, `GB`, `TB` are
/// decimal. Case-insensitive, optional `B` suffix, optional space, fractions allowed (`1.5G`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size: give bytes or a number with a unit, e.g. 4M, 1GiB, 512KiB".into());
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("size {s:?} does not start with a number (e.g. 4M, 1GiB, 512KiB)"));
    }
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kib" | "ki" => 1 << 10,
        "m" | "mib" | "mi" => 1 << 20,
        "g" | "gib" | "gi" => 1 << 30,
        "t" | "tib" | "ti" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in size {s:?} (use K, M, G, T, KiB, MiB, GiB, KB, MB, GB or bytes)"
            ))
        }
    };
    if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| format!("bad number {num:?} in size {s:?}"))?;
        let bytes = v * mult as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("size {s:?} is too large"));
        }
        if bytes.fract() != 0.0 {
            return Err(format!("size {s:?} is not a whole number of bytes"));
        }
        return Ok(bytes as u64);
    }
    let v: u64 = num.parse().map_err(|_| format!("bad number {num:?} in size {s:?}"))?;
    v.checked_mul(mult).ok_or_else(|| format!("size {s:?} overflows 64 bits"))
}

/// Parses a duration with a unit: `300ms`, `1.5s`, `2m`, `250us`, `1h` (a unit is required: a
/// bare number would be ambiguous between QEMU's milliseconds and seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 =
        num.parse().map_err(|_| format!("duration {s:?} does not start with a number (e.g. 300ms, 2s, 1m)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "" => return Err(format!("duration {s:?} has no unit: give e.g. {num}ms or {num}s")),
        u => return Err(format!("unknown unit {u:?} in duration {s:?} (use us, ms, s, m or h)")),
    };
    let secs = v * mult;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("duration {s:?} is too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a timeout: a bare number is seconds (`90`, `0.5`), else a duration with a unit as
/// [`parse_duration`] takes (`500ms`, `2m`); at most a day. Zero passes here: what it means
/// (`--connect-timeout 0`: one attempt) or why it is refused (a zero stall timeout, by the
/// engine's settings check) is the option's to say.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = match t.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.0..=86_400.0).contains(&secs) => Duration::from_secs_f64(secs),
        Ok(_) => return Err(format!("timeout {s:?} is out of range (0 to 86400 s)")),
        Err(_) => parse_duration(t)?,
    };
    if d > Duration::from_secs(86_400) {
        return Err(format!("timeout {s:?} is longer than a day (86400 s)"));
    }
    Ok(d)
}

/// A duration in milliseconds, for reports.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Formats a duration compactly (`850.0 us`, `12.30 ms`, `1.50 s`).
pub fn fmt_dur(d: Duration) -> String {
    fmt_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A size argument that must fit `usize` and be at least `min`.
pub fn parse_size_usize(s: &str) -> Result<usize, String> {
    let v = parse_size(s)?;
    usize::try_from(v).map_err(|_| format!("size {s:?} does not fit this platform"))
}

/// Formats bytes with binary units (`1.50 GiB`).
pub fn fmt_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

/// Formats a chunk-like size compactly (`64K`, `1M`, `4M`).
pub fn fmt_size_short(b: u64) -> String {
    if b >= 1 << 30 && b % (1 << 30) == 0 {
        format!("{}G", b >> 30)
    } else if b >= 1 << 20 && b % (1 << 20) == 0 {
        format!("{}M", b >> 20)
    } else if b >= 1 << 10 && b % (1 << 10) == 0 {
        format!("{}K", b >> 10)
    } else {
        format!("{b}")
    }
}

/// `X.XX GiB/s (Y.Y Gbit/s)`.
pub fn fmt_rate(bytes: u64, secs: f64) -> String {
    let s = secs.max(1e-9);
    format!("{:.2} GiB/s ({:.1} Gbit/s)", bytes as f64 / s / (1u64 << 30) as f64, bytes as f64 * 8.0 / s / 1e9)
}

/// Nanoseconds as a short human duration.
pub fn fmt_ns(ns: u64) -> String {
    if ns >= 1_000_000_000 {
        format!("{:.2} s", ns as f64 / 1e9)
    } else if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else if ns >= 1_000 {
        format!("{:.1} us", ns as f64 / 1e3)
    } else {
        format!("{ns} ns")
    }
}

/// User + system CPU time of this process so far (`getrusage(RUSAGE_SELF)`), and its peak RSS.
pub fn rusage_self() -> (Duration, u64) {
    use nix::sys::resource::{getrusage, UsageWho};
    use nix::sys::time::TimeValLike;
    let Ok(ru) = getrusage(UsageWho::RUSAGE_SELF) else { return (Duration::ZERO, 0) };
    let us = |t: nix::sys::time::TimeVal| Duration::from_micros(t.num_microseconds().max(0) as u64);
    (us(ru.user_time()) + us(ru.system_time()), (ru.max_rss() as u64).saturating_mul(1024))
}

/// Kernel release (`uname -r`) and machine.
pub fn kernel_version() -> String {
    let Ok(u) = nix::sys::utsname::uname() else { return "unknown".into() };
    let f = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
    format!("{} {} {}", f(u.sysname()), f(u.release()), f(u.machine()))
}

/// Seconds since the epoch, and an RFC-3339-ish UTC string, as iperf3's `timestamp`.
pub fn timestamp() -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let (d, rem) = (secs / 86400, secs % 86400);
    let (y, m, day) = civil_from_days(d as i64);
    json!({
        "timesecs": secs,
        "time": format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60),
    })
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// fio-style `lat_ns` object.
pub fn lat_json(l: &LatencySummary) -> Value {
    json!({
        "min": l.min_ns, "max": l.max_ns, "mean": l.mean_ns, "stddev": l.stddev_ns, "N": l.count,
        "percentile": {
            "50.000000": l.p50_ns, "90.000000": l.p90_ns, "99.000000": l.p99_ns, "99.900000": l.p999_ns,
        },
    })
}

/// One iperf3-style interval: bytes moved in `[start, end)` seconds after the start.
#[derive(Debug, Clone)]
pub struct Interval {
    /// Seconds since the transfer started.
    pub start: f64,
    /// Seconds since the transfer started.
    pub end: f64,
    /// Bytes moved in the interval.
    pub bytes: u64,
    /// Cumulative bytes at `end`.
    pub total: u64,
}

impl Interval {
    /// iperf3-style JSON.
    pub fn json(&self) -> Value {
        let secs = (self.end - self.start).max(1e-9);
        json!({
            "timestamp": timestamp(),
            "sum": {
                "start": self.start, "end": self.end, "seconds": secs, "bytes": self.bytes,
                "bits_per_second": self.bytes as f64 * 8.0 / secs, "cumulative_bytes": self.total,
            }
        })
    }
}

/// Whether progress bars may be drawn: stderr is a terminal and the output is not JSON.
pub fn bars_allowed(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// The one place progress bars are made: hidden in JSON mode or without a terminal.
pub fn progress_bar(total: Option<u64>, visible: bool, what: &str) -> ProgressBar {
    if !visible {
        return ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden());
    }
    let pb = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let tmpl = if total.is_some() {
        "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg} [{elapsed_precise}] {spinner} {bytes} {bytes_per_sec}"
    };
    if let Ok(st) = ProgressStyle::with_template(tmpl) {
        pb.set_style(st);
    }
    pb.set_message(what.to_owned());
    pb
}

/// Live status (the pre-copy state of each device, one line each) that the progress bar shows
/// under itself; written by the thread that drives the transfer.
#[derive(Debug, Clone, Default)]
pub struct StatusLine(Arc<Mutex<Option<String>>>);

impl StatusLine {
    /// Replaces the status.
    pub fn set(&self, s: String) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(s);
    }

    /// The status, if any.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// Runs `f` while a helper thread polls `progress` every 100 ms: it drives the progress bar
/// (labelled `what`, with `status` at its end once set) and records one [`Interval`] per
/// `interval`.
pub fn with_progress<R>(
    progress: &Progress,
    total: Option<u64>,
    visible: bool,
    status: Option<&StatusLine>,
    what: &str,
    interval: Duration,
    f: impl FnOnce() -> R,
) -> (R, Vec<Interval>) {
    let stop = AtomicBool::new(false);
    let pb = progress_bar(total, visible, what);
    let start = Instant::now();
    let interval = interval.max(Duration::from_millis(100));
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut out = Vec::new();
            let (mut last_t, mut last_b) = (0.0f64, 0u64);
            let mut next = interval;
            let mut styled = false;
            loop {
                let done = stop.load(Ordering::Acquire);
                let b = progress.bytes();
                pb.set_position(b);
                if let Some(line) = status.and_then(StatusLine::get) {
                    if !styled {
                        // The status goes under the bar, one line per device.
                        let tmpl = if total.is_some() {
                            "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}\n{msg}"
                        } else {
                            "{prefix} [{elapsed_precise}] {spinner} {bytes} {bytes_per_sec}\n{msg}"
                        };
                        if let Ok(st) = ProgressStyle::with_template(tmpl) {
                            pb.set_style(st);
                        }
                        pb.set_prefix(what.to_owned());
                        styled = true;
                    }
                    pb.set_message(line);
                }
                let el = start.elapsed();
                if el >= next || done {
                    let t = el.as_secs_f64();
                    if t > last_t && (b > last_b || !done) {
                        out.push(Interval { start: last_t, end: t, bytes: b - last_b, total: b });
                    }
                    last_t = t;
                    last_b = b;
                    next += interval;
                }
                if done {
                    return out;
                }
                // Parked, not slept: the end of the transfer wakes it at once (a sleep here
                // added up to 100 ms to every command's run time).
                std::thread::park_timeout(Duration::from_millis(100).min(interval));
            }
        });
        let r = f();
        stop.store(true, Ordering::Release);
        sampler.thread().unpark();
        let iv = sampler.join().unwrap_or_default();
        pb.finish_and_clear();
        (r, iv)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("4m"), Ok(4 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("10b"), Ok(10));
        assert_eq!(parse_size(" 8 "), Ok(8));
        for bad in ["", "M", "4X", "1.3B", "-1", "4MiBs", "99999999999999999999", "20000000T"] {
            let e = parse_size(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(parse_size("4X").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration(" 60 s "), Ok(Duration::from_secs(60)));
        assert!(parse_duration("300").unwrap_err().contains("300ms"));
        assert!(parse_duration("3x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("ms").is_err());
        assert_eq!(fmt_dur(Duration::from_micros(1500)), "1.50 ms");
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_timeout("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_timeout("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_timeout("0"), Ok(Duration::ZERO));
        assert!(parse_timeout("-1").is_err());
        assert!(parse_timeout("2d").unwrap_err().contains("unknown unit"));
        assert!(parse_timeout("25h").unwrap_err().contains("longer than a day"));
        assert!(parse_timeout("1e9").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1 << 30), "1.00 GiB");
        assert_eq!(fmt_bytes(3 << 19), "1.50 MiB");
        assert_eq!(fmt_size_short(64 << 10), "64K");
        assert_eq!(fmt_size_short(4 << 20), "4M");
        assert_eq!(fmt_size_short(1000), "1000");
        assert_eq!(fmt_rate(1 << 30, 1.0), "1.00 GiB/s (8.6 Gbit/s)");
        assert_eq!(fmt_ns(1500), "1.5 us");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }
}
