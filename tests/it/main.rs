//! Integration tests: the real binary against real servers through real
//! sockets (see `harness` for the stack). Run with `make test`, which
//! installs `moto_server`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod alerts;
mod backfill;
mod cli;
mod compose;
mod console;
mod crash;
mod harness;
mod hostile;
mod lean_get;
mod monitor;
mod paths;
mod pipeline;
mod webdriver;
