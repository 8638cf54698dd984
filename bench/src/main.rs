//! `vfio-multifd`: migrate VFIO device state over parallel QEMU-compatible multifd channels
//! (`send`, `recv`, `loopback`), inspect the host (`probe`) and devices (`dev`), and run the
//! benchmark suite (`bench`).
// The command's report printers and benchmark drivers are long lists of fields and scenarios;
// the shape lints hold for the libraries (engine, bindings) and the tests. The benchmark
// rework (the performance issue) splits these.
#![allow(clippy::too_many_lines)]

/// `println!` that never panics: a write error on stdout (a closed pipe: `| head`) is remembered
/// and reported once at exit ([`out::failed`]) instead of panicking mid-transfer.
macro_rules! println {
    () => {
        $crate::out::line(format_args!(""))
    };
    ($($t:tt)*) => {
        $crate::out::line(format_args!($($t)*))
    };
}

/// `eprintln!` that never panics: with stderr gone there is nowhere left to report to.
macro_rules! eprintln {
    ($($t:tt)*) => {
        $crate::out::err_line(format_args!($($t)*))
    };
}

mod cli;
mod dev;
mod dump;
mod guest;
mod live;
mod out;
mod probe;
mod signals;
mod sink;
mod suite;
mod tee;
mod transfer;
mod util;

use clap::{ArgMatches, CommandFactory, FromArgMatches};

use crate::cli::{Cli, Cmd};
use crate::transfer::DevOpt;

/// `--device` and `--sim` values in command-line order.
fn device_order(m: &ArgMatches) -> Vec<DevOpt> {
    let mut v: Vec<(usize, DevOpt)> = Vec::new();
    if let Some(ix) = m.indices_of("device") {
        v.extend(ix.enumerate().map(|(k, i)| (i, DevOpt::Device(k))));
    }
    if let Some(ix) = m.indices_of("sim") {
        v.extend(ix.enumerate().map(|(k, i)| (i, DevOpt::Sim(k))));
    }
    v.sort_by_key(|x| x.0);
    v.into_iter().map(|x| x.1).collect()
}

fn run() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let sub = matches.subcommand().map(|(_, m)| m);
    match &cli.cmd {
        Cmd::Loopback(a) => transfer::loopback(a),
        Cmd::Send(a) => transfer::send(a, &sub.map(device_order).unwrap_or_default()),
        Cmd::Recv(a) => transfer::recv(a, &sub.map(device_order).unwrap_or_default()),
        Cmd::Probe(a) => probe::run(a.json),
        Cmd::Dev(a) => dev::run(&a.cmd),
        Cmd::Bench(a) => suite::run(a),
        Cmd::Dump(a) => dump::run(a),
        Cmd::Tee(a) => tee::run(a),
        Cmd::BenchPeer(a) => suite::peers::run(a),
    }
}

fn main() {
    signals::install();
    let r = run();
    if let Some(sig) = signals::caught() {
        if r.is_ok() {
            // The signal came after the work was done (a sink already in place, a send
            // already committed): the exit status says what happened, which is success.
            eprintln!("vfio-multifd: {} arrived after the command had completed; ignored", signals::name(sig));
        } else {
            // The engine has put the source devices back to RUNNING (or said which it could not).
            let why = r.as_ref().err().map(|e| format!(": {e:#}")).unwrap_or_default();
            eprintln!("vfio-multifd: interrupted by {}{why}", signals::name(sig));
            std::process::exit(128 + sig);
        }
    }
    let r = r.and_then(|()| match out::failed() {
        Some(e) => Err(anyhow::Error::new(e).context("writing the report to standard output")),
        None => Ok(()),
    });
    if let Err(e) = r {
        // Print the cause chain once: the engine's and the uAPI layer's messages already
        // include their sources, so skip a cause whose text the previous one contains.
        let mut msgs: Vec<String> = Vec::new();
        for c in e.chain() {
            let s = c.to_string();
            if !msgs.last().is_some_and(|p| p.contains(&s)) {
                msgs.push(s);
            }
        }
        eprintln!("vfio-multifd: error: {}", msgs.join(": "));
        std::process::exit(1);
    }
}
