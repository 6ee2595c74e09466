//! HAProxy's runtime API: the socket client, its typed commands and the parsers of its
//! answers. This layer knows nothing of HTTP, of lbagent's desired state or of policy; it turns
//! checked values into commands and HAProxy's text back into typed data and classified outcomes.
//!
//! - [`RuntimeClient`]: one persistent interactive connection with deadlines and batching.
//! - [`Connection`]: framing of interactive mode over any byte stream.
//! - [`Command`], [`validate`]: commands built only from checked values.
//! - [`parse`]: nom parsers, no I/O.
//! - [`Outcome`]: what an answer means, with its raw text.

mod client;
mod command;
mod connection;
mod error;
mod outcome;
pub mod parse;
pub mod validate;

pub use client::{ClientOptions, Reply, RuntimeClient};
pub use command::{AddServerOptions, Command, SendProxy, ServerAdminState};
pub use connection::{Connection, Endpoint, Io};
pub use error::{Error, Result};
pub use outcome::{Outcome, OutcomeKind};
pub use validate::{Name, ServerRef};
