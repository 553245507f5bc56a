//! AgentService over an in-process `tokio::io::duplex` transport: a real tonic client and
//! server, no ports.
