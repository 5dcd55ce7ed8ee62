//! The core's `tracing` events, delivered to Python's `logging` under the `trustwire` logger.
//!
//! Events are queued and handed to Python on one thread of their own: a runtime worker that
//! logs never waits for the GIL, and records keep their order.

use std::fmt::Write as _;
use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

struct Record {
    level: Level,
    target: String,
    message: String,
}

struct PythonLogging {
    tx: Mutex<Sender<Record>>,
    max: Level,
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for PythonLogging {
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        *metadata.level() <= self.max && metadata.target().starts_with("trustwire")
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let record = Record {
            level: *event.metadata().level(),
            target: event.metadata().target().to_string(),
            message: fields.message + &fields.rest,
        };
        let _ = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(record);
    }
}

fn python_level(level: Level) -> u32 {
    match level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

/// Installs the forwarding subscriber unless the process already has one. `TRUSTWIRE_LOG=debug`
/// (or `trace`) forwards more than the default `info`.
pub fn install() {
    let max = match std::env::var("TRUSTWIRE_LOG").ok().as_deref() {
        Some(v) if v.contains("trace") => Level::TRACE,
        Some(v) if v.contains("debug") => Level::DEBUG,
        _ => Level::INFO,
    };
    let (tx, rx) = mpsc::channel::<Record>();
    let layer = PythonLogging { tx: Mutex::new(tx), max };
    if tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).is_err() {
        return;
    }
    let _ = std::thread::Builder::new().name("trustwire-logging".into()).spawn(move || {
        crate::pool::serve(rx, |py, record: Record| {
            let result = (|| -> PyResult<()> {
                // trustwire::rpc::server → logger "trustwire.rpc.server"
                let name = record.target.replace("::", ".");
                let logger = py.import("logging")?.getattr("getLogger")?.call1((name,))?;
                logger.call_method1("log", (python_level(record.level), record.message))?;
                Ok(())
            })();
            if let Err(e) = result {
                // Interpreter shutting down, or logging replaced by something broken.
                e.write_unraisable(py, None);
            }
        })
    });
}
