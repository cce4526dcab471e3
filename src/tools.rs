//! Tools a user runs beside the service; they use the library, and
//! nothing in the library uses them.

pub mod baseline;
pub mod demo;
pub mod endpoint;
pub mod events;
pub mod report;
