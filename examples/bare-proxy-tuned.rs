//! The floor as firstgate runs Pingora: `bare-proxy --tuned` with firstgate's allocator
//! (jemalloc). Same arguments as `bare-proxy`.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "bare-proxy.rs"]
mod bare;

fn main() {
    bare::run()
}
