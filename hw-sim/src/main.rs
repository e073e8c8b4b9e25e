//! `hw-sim` binary.

fn main() {
    eprintln!("hw-sim: the simulator is not built yet (see the hardware issues)");
    std::process::exit(2);
}
