//! What the proxy tells about the traffic it carries, apart from the metrics: the access log.

pub mod access_log;
