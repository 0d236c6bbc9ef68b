//! The `panseal-keyd` binary: see the crate documentation of `panseal_keyd`.

fn main() -> std::process::ExitCode {
    panseal_keyd::run()
}
