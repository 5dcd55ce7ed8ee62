//! trustwire: one mutual-TLS implementation for brpc's `baidu_std` RPC protocol.
//!
//! Layers, lowest first: [`wire`] (sans-IO codec), [`tls`] (profiles, verification, identity,
//! policy, the failure catalogue), [`transport`] (tokio-rustls accept/connect), [`rpc`] (client
//! and server). [`pki`] makes development certificates.

pub mod authz;
#[cfg(feature = "cli")]
pub mod cli;
pub mod credentials;
pub mod echo;
pub mod error;
pub mod limits;
pub mod pki;
pub mod profile;
pub mod proxy;
pub mod rpc;
pub mod runtime;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod wire;

pub use error::{Error, Result, Side, Verdict};
pub use rpc::{CallOptions, Client, ClientOptions, Request, Response, Server, ServerOptions, Status};
pub use tls::{PeerIdentity, Policy, TlsProfile};
