//! `capvirt console DOMAIN`: the terminal on a domain's serial console, like `virsh console`;
//! Ctrl-] leaves.
//!
//! Built from two capabilities through the one dispatch path, so it works with any driver
//! that has them, in process or (later) remote: what the guest prints is polled with
//! `domain.console-read` from the end of what it printed before; what the user types is sent a
//! line at a time with `domain.console-write` (the boundary has no input stream yet). The
//! terminal is in raw mode meanwhile so that Ctrl-] is seen at once; the line being typed is
//! echoed and edited here (Backspace, Ctrl-U) and replaced by the guest's own echo on Enter.
//! The terminal is restored on every way out (a guard's `Drop`, also on error or panic).
//! Without a terminal (standard input a pipe), lines are read as they come, for scripts.

use std::{
    io::{IsTerminal, Read, Write},
    os::fd::AsFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use capvirt_plugin_api::{types::DomainState, Value};
use clap::{Arg, ArgMatches, Command};
use nix::sys::termios::{self, SetArg, Termios};

use crate::{context::Context, CliError};
use capvirt_host::{error::ErrorCategory, host::Connection};

/// Ctrl-], virsh's escape.
const ESCAPE: u8 = 0x1d;
/// How often the guest's output is polled.
const POLL: Duration = Duration::from_millis(50);
/// Most bytes fetched per poll.
const CHUNK: u64 = 65536;

pub fn cli() -> Command {
    Command::new("console")
        .about("Attach to a domain's serial console; Ctrl-] leaves [experimental]")
        .long_about(
            "Attach the terminal to the running domain's first serial console, like `virsh console`: what the \
             guest prints from now on is shown, each line typed is sent when Enter is pressed (edit it with \
             Backspace and Ctrl-U), Ctrl-] leaves and restores the terminal. Control keys such as Ctrl-C are \
             not sent (the console takes printable text). Without a terminal, standard input is sent line by \
             line until it ends or holds Ctrl-].\n\nCapabilities: domain.console-read, domain.console-write",
        )
        .arg(Arg::new("domain").value_name("DOMAIN").required(true).help("The running domain"))
}

pub fn exec(m: &ArgMatches, ctx: &mut Context) -> Result<(), CliError> {
    let domain = m.get_one::<String>("domain").cloned().unwrap_or_default();
    let conn = ctx.connect()?;
    let info = conn.call("domain.info", Value::record([("domain", Value::string(&domain))]))?;
    let state = info.get("state").and_then(Value::as_str).unwrap_or_default();
    if state != DomainState::Running.as_str() {
        return Err(CliError::new(
            ErrorCategory::InvalidState,
            format!("domain '{domain}' is not running (state: {state})"),
        ));
    }
    // Only what the guest prints from now on, like virsh.
    let mut offset = read(&conn, &domain, u64::MAX)?.1;
    let interactive = std::io::stdin().is_terminal();
    let raw = if interactive { Some(RawTerminal::enter()?) } else { None };
    status(raw.is_some(), &format!("Connected to domain '{domain}'; escape character is ^]"));

    let done = AtomicBool::new(false);
    let (keys_tx, keys) = mpsc::channel::<Vec<u8>>();
    // Standard input blocks; it gets a thread of its own that outlives nothing (the process
    // ends after this function).
    thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if keys_tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut line: Vec<u8> = Vec::new();
    let outcome = loop {
        if done.load(Ordering::Relaxed) {
            break Ok(());
        }
        match read(&conn, &domain, offset) {
            Ok((data, next)) => {
                offset = next;
                if !data.is_empty() {
                    let mut out = std::io::stdout().lock();
                    // The line being typed is redrawn after the guest's output.
                    if raw.is_some() && !line.is_empty() {
                        let _ = out.write_all(b"\r\x1b[K");
                    }
                    let _ = out.write_all(&data);
                    if raw.is_some() && !line.is_empty() {
                        let _ = out.write_all(&line);
                    }
                    let _ = out.flush();
                }
            }
            Err(e) => break Err(e),
        }
        let keys = match keys.recv_timeout(POLL) {
            Ok(keys) => keys,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            // Standard input ended: what was typed is sent, then the console is left.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if !line.is_empty() {
                    if let Err(e) = send(&conn, &domain, &line) {
                        break Err(e);
                    }
                }
                break Ok(());
            }
        };
        let mut sent = Ok(());
        for key in keys {
            match key {
                ESCAPE => {
                    done.store(true, Ordering::Relaxed);
                    break;
                }
                // Piped input ends its lines with LF (a CR before it is dropped); a terminal's
                // Enter is CR (or LF with Ctrl-J).
                b'\r' if raw.is_none() => {}
                b'\r' | b'\n' => {
                    if raw.is_some() {
                        // The guest echoes the line itself.
                        echo(b"\r\x1b[K");
                    }
                    sent = send(&conn, &domain, &line);
                    line.clear();
                    if sent.is_err() {
                        break;
                    }
                }
                0x7f | 0x08 => {
                    if line.pop().is_some() && raw.is_some() {
                        echo(b"\x08 \x08");
                    }
                }
                0x15 => {
                    line.clear();
                    if raw.is_some() {
                        echo(b"\r\x1b[K");
                    }
                }
                b'\t' | 0x20..=0x7e | 0x80..=0xff => {
                    line.push(key);
                    if raw.is_some() {
                        echo(&[key]);
                    }
                }
                // Other control keys cannot be typed on the console: a bell says so.
                _ => {
                    if raw.is_some() {
                        echo(b"\x07");
                    }
                }
            }
        }
        if let Err(e) = sent {
            break Err(e);
        }
    };
    drop(raw);
    echo(b"\n");
    status(false, &format!("Disconnected from domain '{domain}'"));
    outcome
}

fn echo(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.flush();
}

/// A status line on stderr (in raw mode, lines need their carriage return).
fn status(raw: bool, text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "{text}{}", if raw { "\r\n" } else { "\n" });
}

/// What the guest printed from `offset` on, and where the next read continues.
fn read(conn: &Connection, domain: &str, offset: u64) -> Result<(Vec<u8>, u64), CliError> {
    let args = Value::record([
        ("domain", Value::string(domain)),
        ("offset", Value::UInt(offset)),
        ("max_bytes", Value::UInt(CHUNK)),
    ]);
    let result = conn.call("domain.console-read", args)?;
    let data = result.get("data").and_then(Value::as_bytes).map(<[u8]>::to_vec).unwrap_or_default();
    let next = result.get("next_offset").and_then(Value::as_u64).unwrap_or(offset);
    Ok((data, next))
}

fn send(conn: &Connection, domain: &str, line: &[u8]) -> Result<(), CliError> {
    let text = String::from_utf8_lossy(line);
    let args = Value::record([("domain", Value::string(domain)), ("text", Value::string(&text))]);
    conn.call("domain.console-write", args)?;
    Ok(())
}

/// The terminal in raw mode until dropped.
struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    fn enter() -> Result<RawTerminal, CliError> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())
            .map_err(|e| CliError::other(format!("cannot read the terminal's settings: {e}")))?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .map_err(|e| CliError::other(format!("cannot put the terminal in raw mode: {e}")))?;
        Ok(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}
