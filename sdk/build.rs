// The bindings are generated from ../wit at compile time; rebuild the SDK
// whenever an interface changes, which the macro alone does not always
// make cargo notice.
fn main() {
    println!("cargo:rerun-if-changed=../wit");
}
