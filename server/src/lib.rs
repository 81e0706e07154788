//! stockd: a thread-per-core exact inventory server.

pub mod state;
