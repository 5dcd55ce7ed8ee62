//! The core's logs for C programs. Without this a C++ service could not see why trustwire
//! refused a peer: the core logs through `tracing`, and nothing in a C process listens.
//!
//! From the first trustwire call on, logs go to stderr at the level `TRUSTWIRE_LOG` names
//! (`tracing` filter syntax, e.g. `info` or `trustwire=debug`), warnings and errors when it is
//! unset; `tw_set_log_callback` sends them to the program instead.

use std::cell::Cell;
use std::ffi::{c_char, c_void};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{OnceLock, RwLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::ffi::{self, guard, Failure, UserData};
use crate::tw_result;

/// How much is logged: a level lets through itself and everything more severe.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum tw_log_level {
    /// Nothing.
    TW_LOG_OFF = 0,
    /// Failures trustwire could not handle (a listener that died, …).
    TW_LOG_ERROR = 1,
    /// Refused credentials, a handler that panicked, a peer sending bad frames.
    TW_LOG_WARN = 2,
    /// Refused handshakes and calls with their verdict and reason, credentials going into
    /// service, connections closed by a trust change.
    TW_LOG_INFO = 3,
    /// Accepted handshakes, connections closing.
    TW_LOG_DEBUG = 4,
    /// Everything.
    TW_LOG_TRACE = 5,
}

/// Receives one log record: `level` (never TW_LOG_OFF), `target` (the module that logged,
/// e.g. "trustwire::rpc::server") and `message` (the text, then its fields as `key=value`),
/// NUL-terminated and valid only until it returns. Called on the thread that logged: a
/// runtime thread, an event thread, or a thread of yours inside a trustwire call. So it must
/// be thread-safe and quick, must not block (hand the text to a queue of yours), and must not
/// wait for a thread that is calling `tw_set_log_callback`. Records logged by trustwire calls
/// made from inside it are dropped.
pub type tw_log_fn = Option<
    unsafe extern "C" fn(user_data: *mut c_void, level: tw_log_level, target: *const c_char, message: *const c_char),
>;

struct Callback {
    f: unsafe extern "C" fn(*mut c_void, tw_log_level, *const c_char, *const c_char),
    user_data: UserData,
}

/// Where records go: the program's callback, or stderr when None. Held for reading while a
/// callback runs, so replacing it waits for callbacks in progress.
static SINK: RwLock<Option<Callback>> = RwLock::new(None);

struct Filter {
    handle: reload::Handle<EnvFilter, Registry>,
    /// TRUSTWIRE_LOG was set: it decides, whatever level the program asks for.
    from_env: bool,
}

static FILTER: OnceLock<Option<Filter>> = OnceLock::new();

thread_local! {
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Starts sending the core's logs to stderr (or the callback), once per process. Every
/// exported function that can log calls it (through `guard`).
pub fn init() {
    FILTER.get_or_init(|| {
        let env = std::env::var("TRUSTWIRE_LOG").ok();
        let parsed = env.as_deref().map(EnvFilter::try_new);
        let from_env = matches!(parsed, Some(Ok(_)));
        let filter = match parsed {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                let _ = writeln!(std::io::stderr(), "trustwire: TRUSTWIRE_LOG ignored ({e}); logging warnings");
                EnvFilter::new("warn")
            }
            None => EnvFilter::new("warn"),
        };
        let (layer, handle) = reload::Layer::new(filter);
        // The process may have a subscriber of its own (a Rust program linking us): keep it.
        tracing_subscriber::registry().with(layer).with(Sink).try_init().ok()?;
        Some(Filter { handle, from_env })
    });
}

fn level_of(l: &Level) -> tw_log_level {
    match *l {
        Level::ERROR => tw_log_level::TW_LOG_ERROR,
        Level::WARN => tw_log_level::TW_LOG_WARN,
        Level::INFO => tw_log_level::TW_LOG_INFO,
        Level::DEBUG => tw_log_level::TW_LOG_DEBUG,
        Level::TRACE => tw_log_level::TW_LOG_TRACE,
    }
}

fn directive(level: tw_log_level) -> &'static str {
    match level {
        tw_log_level::TW_LOG_OFF => "off",
        tw_log_level::TW_LOG_ERROR => "error",
        tw_log_level::TW_LOG_WARN => "warn",
        tw_log_level::TW_LOG_INFO => "info",
        tw_log_level::TW_LOG_DEBUG => "debug",
        tw_log_level::TW_LOG_TRACE => "trace",
    }
}

/// The message, then every other field as ` key=value`.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

struct Sink;

impl<S: Subscriber> Layer<S> for Sink {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if IN_CALLBACK.with(Cell::get) {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let meta = event.metadata();
        let line = text.message + &text.fields;
        let sink = SINK.read().unwrap_or_else(|p| p.into_inner());
        match &*sink {
            Some(cb) => {
                let target = ffi::owned_cstring(meta.target());
                let message = ffi::owned_cstring(line);
                IN_CALLBACK.with(|c| c.set(true));
                unsafe { (cb.f)(cb.user_data.0, level_of(meta.level()), target.as_ptr(), message.as_ptr()) };
                IN_CALLBACK.with(|c| c.set(false));
            }
            None => {
                // A closed stderr loses the line; it must not take the program down.
                let _ = writeln!(std::io::stderr().lock(), "trustwire {:>5} {}: {line}", meta.level(), meta.target());
            }
        }
    }
}

/// Sends trustwire's logs at `level` and more severe to `callback` (see `tw_log_fn` for the
/// thread it runs on), with `user_data` passed back unchanged; a NULL `callback` sends them
/// to stderr again. The default, before any call, is stderr at TW_LOG_WARN. When the
/// environment variable TRUSTWIRE_LOG is set (e.g. "info", "trustwire=debug"), it decides the
/// level instead of `level`, so an operator can turn logs up without a rebuild.
///
/// When it returns, the previous callback is not running and will not be called again (its
/// `user_data` may be freed). Any thread; TW_WOULD_BLOCK from inside a log callback.
/// TW_INVALID_ARGUMENT for a level that is not a tw_log_level.
#[no_mangle]
pub unsafe extern "C" fn tw_set_log_callback(level: u32, callback: tw_log_fn, user_data: *mut c_void) -> tw_result {
    guard(|| {
        if IN_CALLBACK.with(Cell::get) {
            return Err(Failure::new(
                tw_result::TW_WOULD_BLOCK,
                "tw_set_log_callback was called from inside a log callback, where it would wait for itself",
            ));
        }
        let level = [
            tw_log_level::TW_LOG_OFF,
            tw_log_level::TW_LOG_ERROR,
            tw_log_level::TW_LOG_WARN,
            tw_log_level::TW_LOG_INFO,
            tw_log_level::TW_LOG_DEBUG,
            tw_log_level::TW_LOG_TRACE,
        ]
        .into_iter()
        .find(|l| *l as u32 == level)
        .ok_or_else(|| Failure::new(tw_result::TW_INVALID_ARGUMENT, format!("{level} is not a tw_log_level")))?;
        *SINK.write().unwrap_or_else(|p| p.into_inner()) =
            callback.map(|f| Callback { f, user_data: UserData(user_data) });
        if let Some(Some(filter)) = FILTER.get() {
            if !filter.from_env {
                filter.handle.reload(EnvFilter::new(directive(level))).map_err(|e| {
                    Failure::new(tw_result::TW_INVALID_CONFIG, format!("cannot change the log level: {e}"))
                })?;
            }
        }
        Ok(())
    })
}
