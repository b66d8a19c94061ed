//! The `taskmesh.v1` protocol, shared by every program: the generated
//! messages, clients and servers ([`pb`]), the encoded descriptor set that
//! server reflection serves, and [`Bearer`], the one interceptor every
//! client uses to send its token.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("taskmesh.v1");

    /// The encoded descriptors of every taskmesh.v1 file, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/taskmesh_descriptor.bin"));
}

/// Adds `authorization: Bearer <token>` to every call; [`Bearer::none`]
/// adds nothing (for calls that must be refused as unauthenticated).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

/// A token that cannot travel in a header.
#[derive(Debug, thiserror::Error)]
#[error("the token must be printable ASCII without spaces")]
pub struct InvalidToken;

impl Bearer {
    pub fn new(token: &str) -> Result<Bearer, InvalidToken> {
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidToken);
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| InvalidToken)?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }

    pub fn none() -> Bearer {
        Bearer(None)
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(..)")
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_must_fit_a_header() {
        assert!(Bearer::new("tmu_abc").is_ok());
        assert!(
            Bearer::new(" tmu_abc\n").is_ok(),
            "surrounding space is trimmed"
        );
        assert!(Bearer::new("").is_err());
        assert!(Bearer::new("a b").is_err());
        assert!(Bearer::new("tök").is_err());
        let mut req = Request::new(());
        req = Bearer::new("t").unwrap().call(req).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer t");
        let req = Bearer::none().call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }
}
