//! The `vdiskfs` command; everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    vdiskfs::cli::main()
}
