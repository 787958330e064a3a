//! Command-line front end pieces: output rendering, the interactive shell, the demo.

pub mod demo;
pub mod output;
pub mod shell;
