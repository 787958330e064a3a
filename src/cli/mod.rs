//! Command-line front end pieces: output rendering, the interactive shell, the demo, training.

pub mod demo;
pub mod output;
pub mod shell;
pub mod train;
