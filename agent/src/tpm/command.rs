//! TPM 2.0 command marshalling for the few commands the freeze anchor needs (TPM 2.0
//! Library, Part 3): NV_ReadPublic, NV_DefineSpace of a counter, NV_Increment, NV_Read and
//! Startup. Pure bytes in, bytes out; the same bytes `scripts/tpm-cost.sh` sends.
//!
//! Every authorisation is a password session with the empty password (`TPM_RS_PW`): the
//! counter's own authorisation value is empty, and defining it takes the owner hierarchy's,
//! empty unless the machine's owner set one.

use thiserror::Error;

pub const ST_NO_SESSIONS: u16 = 0x8001;
pub const ST_SESSIONS: u16 = 0x8002;
const RS_PW: u32 = 0x4000_0009;
pub const RH_OWNER: u32 = 0x4000_0001;
const ALG_SHA256: u16 = 0x000B;

pub const CC_NV_DEFINE_SPACE: u32 = 0x12A;
pub const CC_NV_INCREMENT: u32 = 0x134;
pub const CC_STARTUP: u32 = 0x144;
pub const CC_NV_READ: u32 = 0x14E;
pub const CC_NV_READ_PUBLIC: u32 = 0x169;

/// `TPMA_NV` bits (Part 2, 13.4).
pub const NV_OWNERWRITE: u32 = 1 << 1;
pub const NV_AUTHWRITE: u32 = 1 << 2;
/// `TPM_NT_COUNTER` in the 4-bit type field at bit 4.
pub const NV_TYPE_COUNTER: u32 = 1 << 4;
const NV_TYPE_MASK: u32 = 0xF << 4;
pub const NV_OWNERREAD: u32 = 1 << 17;
pub const NV_AUTHREAD: u32 = 1 << 18;
/// No dictionary-attack lockout for this index (its password is empty anyway).
pub const NV_NO_DA: u32 = 1 << 25;
/// Written at least once (a counter reads only after its first increment).
pub const NV_WRITTEN: u32 = 1 << 29;

/// The counter's attributes: read and incremented with its own (empty) authorisation, so
/// an owner password set later does not lock the agent out; the owner may too.
pub const COUNTER_ATTRIBUTES: u32 =
    NV_TYPE_COUNTER | NV_OWNERWRITE | NV_AUTHWRITE | NV_OWNERREAD | NV_AUTHREAD | NV_NO_DA;

/// Response codes the client tells apart.
pub const RC_SUCCESS: u32 = 0;
/// `TPM_RC_INITIALIZE`: Startup was already done.
pub const RC_INITIALIZE: u32 = 0x100;
/// `TPM_RC_NV_UNINITIALIZED`: a counter never incremented.
pub const RC_NV_UNINITIALIZED: u32 = 0x14A;
/// `TPM_RC_NV_DEFINED`: the index exists already.
pub const RC_NV_DEFINED: u32 = 0x14C;

/// A format-one response code about handle 1 being `TPM_RC_HANDLE` (no such NV index).
pub fn is_missing_handle(rc: u32) -> bool {
    rc & 0x80 != 0 && rc & 0x3F == 0x0B
}

/// A format-one `TPM_RC_BAD_AUTH` or `TPM_RC_AUTH_FAIL`: a password was needed.
pub fn is_auth_failure(rc: u32) -> bool {
    rc & 0x80 != 0 && matches!(rc & 0x3F, 0x22 | 0x0E)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("the TPM's response is {0} bytes, shorter than a response header")]
    Short(usize),
    #[error("the TPM's response header says {said} bytes but {got} arrived")]
    Size { said: usize, got: usize },
    #[error("the TPM's response to {0} is malformed")]
    Malformed(&'static str),
}

fn command(cc: u32, handles: &[u32], session: bool, params: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + params.len());
    for h in handles {
        body.extend_from_slice(&h.to_be_bytes());
    }
    if session {
        // TPMS_AUTH_COMMAND: TPM_RS_PW, empty nonce, attributes 0, empty password.
        let mut auth = Vec::with_capacity(9);
        auth.extend_from_slice(&RS_PW.to_be_bytes());
        auth.extend_from_slice(&0u16.to_be_bytes());
        auth.push(0);
        auth.extend_from_slice(&0u16.to_be_bytes());
        body.extend_from_slice(&(auth.len() as u32).to_be_bytes());
        body.extend_from_slice(&auth);
    }
    body.extend_from_slice(params);
    let tag = if session { ST_SESSIONS } else { ST_NO_SESSIONS };
    let mut out = Vec::with_capacity(10 + body.len());
    out.extend_from_slice(&tag.to_be_bytes());
    out.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    out.extend_from_slice(&cc.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// `TPM2_Startup(TPM_SU_CLEAR)`: only for a raw simulator socket (the kernel starts a
/// device's TPM).
pub fn startup_clear() -> Vec<u8> {
    command(CC_STARTUP, &[], false, &0u16.to_be_bytes())
}

pub fn nv_read_public(index: u32) -> Vec<u8> {
    command(CC_NV_READ_PUBLIC, &[index], false, &[])
}

/// `TPM2_NV_DefineSpace` of an 8-byte counter at `index`, empty authorisation value.
pub fn nv_define_counter(index: u32) -> Vec<u8> {
    let mut public = Vec::with_capacity(14);
    public.extend_from_slice(&index.to_be_bytes());
    public.extend_from_slice(&ALG_SHA256.to_be_bytes());
    public.extend_from_slice(&COUNTER_ATTRIBUTES.to_be_bytes());
    public.extend_from_slice(&0u16.to_be_bytes()); // no policy
    public.extend_from_slice(&8u16.to_be_bytes()); // dataSize
    let mut params = Vec::with_capacity(18);
    params.extend_from_slice(&0u16.to_be_bytes()); // auth: empty
    params.extend_from_slice(&(public.len() as u16).to_be_bytes());
    params.extend_from_slice(&public);
    command(CC_NV_DEFINE_SPACE, &[RH_OWNER], true, &params)
}

/// `TPM2_NV_Increment`, authorised by the index itself.
pub fn nv_increment(index: u32) -> Vec<u8> {
    command(CC_NV_INCREMENT, &[index, index], true, &[])
}

/// `TPM2_NV_Read` of the counter's 8 bytes, authorised by the index itself.
pub fn nv_read_counter(index: u32) -> Vec<u8> {
    let mut params = [0u8; 4];
    params[..2].copy_from_slice(&8u16.to_be_bytes());
    command(CC_NV_READ, &[index, index], true, &params)
}

/// The whole response's length from its first 10 bytes (the header).
pub fn response_len(header: &[u8]) -> Result<usize, ParseError> {
    let h: &[u8; 10] = header
        .get(..10)
        .and_then(|h| h.try_into().ok())
        .ok_or(ParseError::Short(header.len()))?;
    let size = u32::from_be_bytes([h[2], h[3], h[4], h[5]]) as usize;
    if size < 10 {
        return Err(ParseError::Size {
            said: size,
            got: header.len(),
        });
    }
    Ok(size)
}

/// A response: its code and what follows the header.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub rc: u32,
    pub tag: u16,
    pub body: Vec<u8>,
}

pub fn parse_response(bytes: &[u8]) -> Result<Response, ParseError> {
    let size = response_len(bytes)?;
    if size != bytes.len() {
        return Err(ParseError::Size {
            said: size,
            got: bytes.len(),
        });
    }
    Ok(Response {
        tag: u16::from_be_bytes([bytes[0], bytes[1]]),
        rc: u32::from_be_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]),
        body: bytes[10..].to_vec(),
    })
}

/// What `NV_ReadPublic` says about an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvPublic {
    pub index: u32,
    pub attributes: u32,
    pub data_size: u16,
}

impl NvPublic {
    pub fn is_counter(&self) -> bool {
        self.attributes & NV_TYPE_MASK == NV_TYPE_COUNTER && self.data_size == 8
    }
    /// The agent can read and increment it with the empty index password.
    pub fn agent_usable(&self) -> bool {
        self.attributes & (NV_AUTHREAD | NV_AUTHWRITE) == NV_AUTHREAD | NV_AUTHWRITE
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The body of a successful `NV_ReadPublic` (no sessions): `TPM2B_NV_PUBLIC`, then a name.
pub fn parse_nv_public(body: &[u8]) -> Result<NvPublic, ParseError> {
    let bad = ParseError::Malformed("NV_ReadPublic");
    let size = be16(body, 0).ok_or(bad)? as usize;
    if size < 14 || body.len() < 2 + size {
        return Err(ParseError::Malformed("NV_ReadPublic"));
    }
    let index = be32(body, 2).ok_or(ParseError::Malformed("NV_ReadPublic"))?;
    let attributes = be32(body, 8).ok_or(ParseError::Malformed("NV_ReadPublic"))?;
    let policy = be16(body, 12).ok_or(ParseError::Malformed("NV_ReadPublic"))? as usize;
    let data_size = be16(body, 14 + policy).ok_or(ParseError::Malformed("NV_ReadPublic"))?;
    Ok(NvPublic {
        index,
        attributes,
        data_size,
    })
}

/// The body of a successful `NV_Read` of a counter (with sessions): the parameter size,
/// then `TPM2B_MAX_NV_BUFFER` holding the 8-byte big-endian value.
pub fn parse_counter(body: &[u8]) -> Result<u64, ParseError> {
    let bad = || ParseError::Malformed("NV_Read");
    if be16(body, 4).ok_or_else(bad)? != 8 {
        return Err(bad());
    }
    let v = body.get(6..14).ok_or_else(bad)?;
    Ok(u64::from_be_bytes(v.try_into().map_err(|_| bad())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The bytes of `scripts/tpm-cost.sh`'s commands (owner-authorised there; here the
    /// index authorises itself), checked against Part 3's layouts by hand.
    #[test]
    fn commands_are_marshalled_as_part_3_says() {
        let idx = 0x0180_0100;
        assert_eq!(hex(&startup_clear()), "80010000000c000001440000");
        assert_eq!(hex(&nv_read_public(idx)), "80010000000e0000016901800100");
        // tag, size 31, cc, handle, handle, auth size 9, TPM_RS_PW, nonce, attrs, password.
        assert_eq!(
            hex(&nv_increment(idx)),
            "80020000001f00000134018001000180010000000009400000090000000000"
        );
        assert_eq!(
            hex(&nv_read_counter(idx)),
            "8002000000230000014e018001000180010000000009400000090000000000\
             00080000"
        );
        let define = nv_define_counter(idx);
        assert_eq!(
            hex(&define),
            format!(
                "80020000002d0000012a4000000100000009400000090000000000\
                 0000000e{}000b{:08x}00000008",
                "01800100", COUNTER_ATTRIBUTES
            )
        );
        assert_eq!(response_len(&define).unwrap(), define.len());
    }

    #[test]
    fn responses_and_their_codes() {
        let ok = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0, 0, 0xAB, 0xCD];
        let r = parse_response(&ok).unwrap();
        assert_eq!((r.rc, r.tag, r.body), (0, ST_NO_SESSIONS, vec![0xAB, 0xCD]));
        assert_eq!(parse_response(&ok[..5]), Err(ParseError::Short(5)));
        assert!(matches!(
            parse_response(&ok[..11]),
            Err(ParseError::Size { said: 12, got: 11 })
        ));
        assert!(is_missing_handle(0x18B));
        assert!(!is_missing_handle(RC_NV_UNINITIALIZED));
        assert!(is_auth_failure(0x9A2) && is_auth_failure(0x98E));
        assert!(!is_auth_failure(0x18B));
    }

    #[test]
    fn nv_public_and_counter_values_parse() {
        // size 14: index, sha256, attributes, empty policy, dataSize 8; then a name.
        let mut b = vec![0, 14, 0x01, 0x80, 0x01, 0x00, 0x00, 0x0B];
        b.extend_from_slice(&(COUNTER_ATTRIBUTES | NV_WRITTEN).to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 8, 0, 2, 0xAA, 0xBB]);
        let p = parse_nv_public(&b).unwrap();
        assert_eq!(p.index, 0x0180_0100);
        assert!(p.is_counter() && p.agent_usable());
        let mut ordinary = p;
        ordinary.attributes &= !NV_TYPE_MASK;
        assert!(!ordinary.is_counter());
        assert!(parse_nv_public(&b[..9]).is_err());
        // parameterSize, TPM2B(8 bytes), then the session's response.
        let mut r = vec![0, 0, 0, 10, 0, 8];
        r.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        r.extend_from_slice(&[0, 0, 1, 0, 0]);
        assert_eq!(parse_counter(&r).unwrap(), 0x0102_0304_0506_0708);
        assert!(parse_counter(&r[..10]).is_err());
    }
}
