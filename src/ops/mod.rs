//! Operations: assembling the Pingora server (the proxy and metrics services), the connection
//! limits Pingora does not enforce, the metrics listener, and the ready `ProxyHttp`.

pub mod alerts;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod server;
