//! C ABI over `kooagent-client`. The header `include/kooagent.h` is generated from this file
//! by cbindgen and checked in (a test fails when it is stale).
//!
//! Rules every function follows:
//! - Returns a `KooagentStatus`; 0 is success, negative values are errors. The last error's
//!   message is kept per thread: `kooagent_last_error()`.
//! - Never unwinds into C: every body runs inside `catch_unwind` and a panic becomes
//!   `KOOAGENT_STATUS_ERR_PANIC`.
//! - A client handle may be shared between threads: calls on it are serialised.
//! - Strings in are NUL-terminated UTF-8; strings out are either written into the caller's
//!   buffer or allocated by us and released with `kooagent_string_free`.

#![allow(clippy::missing_safety_doc)] // the safety contract is the header's documentation

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use kooagent_client::{CachedClient, Client, ClientError};
use serde_json::{json, Value};

/// Result of every call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KooagentStatus {
    Ok = 0,
    /// A NULL or non-UTF-8 argument, or params that are not a JSON object.
    ErrInvalidArgument = -1,
    /// The agent's socket cannot be reached.
    ErrConnect = -2,
    ErrIo = -3,
    /// No answer within the client's timeout.
    ErrTimeout = -4,
    /// The agent's answer could not be understood.
    ErrProtocol = -5,
    /// The agent answered with an error; `kooagent_last_error()` starts with its code.
    ErrAgent = -6,
    /// The output buffer is too small; nothing was written.
    ErrBufferTooSmall = -7,
    /// A bug inside the library was caught before it could reach the caller.
    ErrPanic = -8,
    /// The connection broke after a state-changing request was sent: it may or may not
    /// have been applied.
    ErrConnectionLost = -9,
    /// A cached client used in a process forked after it was opened: its background thread
    /// did not survive the fork. Open a new one in this process.
    ErrForked = -10,
}

/// Verdict of `kooagent_check`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KooagentState {
    Unknown = 0,
    Valid = 1,
    Grace = 2,
    Expired = 3,
    NotYetValid = 4,
    WrongDevice = 5,
    BadSignature = 6,
    UntrustedKey = 7,
    ClockRollback = 8,
    Frozen = 9,
    NoLicense = 10,
}

impl KooagentState {
    fn from_name(s: &str) -> KooagentState {
        match s {
            "valid" => KooagentState::Valid,
            "grace" => KooagentState::Grace,
            "expired" => KooagentState::Expired,
            "not_yet_valid" => KooagentState::NotYetValid,
            "wrong_device" => KooagentState::WrongDevice,
            "bad_signature" => KooagentState::BadSignature,
            "untrusted_key" => KooagentState::UntrustedKey,
            "clock_rollback" => KooagentState::ClockRollback,
            "frozen" => KooagentState::Frozen,
            "no_license" | "missing" | "not_installed" => KooagentState::NoLicense,
            _ => KooagentState::Unknown,
        }
    }
}

/// What `kooagent_check` fills in.
#[repr(C)]
pub struct KooagentCheck {
    pub state: KooagentState,
    /// 1 when the software may run (valid or grace, and the feature, if asked, is granted).
    pub allowed: c_int,
    /// Whole days until the license (or its grace) ends; -1 when perpetual or unknown.
    pub days_left: i64,
    /// The license that answered, NUL-terminated (empty when none).
    pub license_id: [c_char; 128],
}

/// An open connection to the agent (opaque).
pub struct KooagentClient {
    inner: Mutex<Client>,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl Into<String>) {
    let msg = msg.into().replace('\0', " ");
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(msg).unwrap_or_default());
}

fn fail(status: KooagentStatus, msg: impl Into<String>) -> KooagentStatus {
    set_error(msg);
    status
}

fn from_client_error(e: ClientError) -> KooagentStatus {
    let status = match &e {
        ClientError::Connect { .. } => KooagentStatus::ErrConnect,
        ClientError::Io(_) => KooagentStatus::ErrIo,
        ClientError::Timeout(_) => KooagentStatus::ErrTimeout,
        ClientError::ConnectionLost => KooagentStatus::ErrConnectionLost,
        ClientError::BadAnswer(_) => KooagentStatus::ErrProtocol,
        ClientError::Op { .. } => KooagentStatus::ErrAgent,
    };
    fail(status, e.to_string())
}

/// Runs `f`, turning a panic into ErrPanic.
fn guard(f: impl FnOnce() -> KooagentStatus) -> KooagentStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(s) => {
            if s == KooagentStatus::Ok {
                set_error("");
            }
            s
        }
        Err(_) => fail(
            KooagentStatus::ErrPanic,
            "internal error (panic) in libkooagent",
        ),
    }
}

unsafe fn str_arg<'a>(p: *const c_char, name: &str) -> Result<&'a str, KooagentStatus> {
    if p.is_null() {
        return Err(fail(
            KooagentStatus::ErrInvalidArgument,
            format!("{name} is NULL"),
        ));
    }
    CStr::from_ptr(p).to_str().map_err(|_| {
        fail(
            KooagentStatus::ErrInvalidArgument,
            format!("{name} is not UTF-8"),
        )
    })
}

unsafe fn opt_str_arg<'a>(p: *const c_char, name: &str) -> Result<Option<&'a str>, KooagentStatus> {
    if p.is_null() {
        Ok(None)
    } else {
        str_arg(p, name).map(Some)
    }
}

/// `params_json` as a JSON object; NULL means `{}`.
unsafe fn params_arg(params_json: *const c_char) -> Result<Value, KooagentStatus> {
    match opt_str_arg(params_json, "params_json")? {
        None => Ok(json!({})),
        Some(p) => match serde_json::from_str::<Value>(p) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(fail(
                KooagentStatus::ErrInvalidArgument,
                "params_json is not a JSON object",
            )),
        },
    }
}

fn with_client(
    c: *mut KooagentClient,
    f: impl FnOnce(&mut Client) -> KooagentStatus,
) -> KooagentStatus {
    if c.is_null() {
        return fail(KooagentStatus::ErrInvalidArgument, "client is NULL");
    }
    // SAFETY: a non-NULL handle came from kooagent_open and is not yet closed (contract).
    let client = unsafe { &*c };
    let mut guard = match client.inner.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    f(&mut guard)
}

/// Opens a client for the agent's socket. `socket_path` may be NULL: then
/// `$KOOAGENT_SOCKET`, the system agent's `/run/kooagent/agent.sock`, or the per-user
/// socket is used. Connects lazily (the first call connects; later calls reconnect after an
/// agent restart). Returns NULL only when `socket_path` is not UTF-8. Free with
/// `kooagent_close`.
#[no_mangle]
pub unsafe extern "C" fn kooagent_open(socket_path: *const c_char) -> *mut KooagentClient {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let path = match opt_str_arg(socket_path, "socket_path") {
            Ok(Some(p)) => PathBuf::from(p),
            Ok(None) => kooagent_client::default_socket_path(),
            Err(_) => return std::ptr::null_mut(),
        };
        Box::into_raw(Box::new(KooagentClient {
            inner: Mutex::new(Client::new(path)),
        }))
    }));
    r.unwrap_or(std::ptr::null_mut())
}

/// Closes a client. NULL is allowed.
#[no_mangle]
pub unsafe extern "C" fn kooagent_close(client: *mut KooagentClient) {
    if !client.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(client))));
    }
}

/// Sets how long one answer may take, in milliseconds (default 30000).
#[no_mangle]
pub unsafe extern "C" fn kooagent_set_timeout_ms(
    client: *mut KooagentClient,
    ms: u64,
) -> KooagentStatus {
    guard(|| {
        with_client(client, |c| {
            let taken = std::mem::replace(c, Client::new(c.path().to_path_buf()));
            *c = taken.timeout(std::time::Duration::from_millis(ms.max(1)));
            KooagentStatus::Ok
        })
    })
}

/// May the software run? Asks `license.check` for `product` (and `feature`, which may be
/// NULL) and fills `out`.
#[no_mangle]
pub unsafe extern "C" fn kooagent_check(
    client: *mut KooagentClient,
    product: *const c_char,
    feature: *const c_char,
    out: *mut KooagentCheck,
) -> KooagentStatus {
    guard(|| {
        let product = match str_arg(product, "product") {
            Ok(p) => p,
            Err(s) => return s,
        };
        let feature = match opt_str_arg(feature, "feature") {
            Ok(f) => f,
            Err(s) => return s,
        };
        if out.is_null() {
            return fail(KooagentStatus::ErrInvalidArgument, "out is NULL");
        }
        with_client(client, |c| match c.check(product, feature) {
            Ok(check) => {
                // SAFETY: out is non-NULL and points to a KooagentCheck (contract).
                let out = &mut *out;
                fill_check(
                    out,
                    &check.state,
                    check.allowed,
                    check.days_left,
                    check.license_id.as_deref(),
                );
                KooagentStatus::Ok
            }
            Err(e) => from_client_error(e),
        })
    })
}

fn fill_check(
    out: &mut KooagentCheck,
    state: &str,
    allowed: bool,
    days_left: Option<i64>,
    license_id: Option<&str>,
) {
    out.state = KooagentState::from_name(state);
    out.allowed = c_int::from(allowed);
    out.days_left = days_left.unwrap_or(-1);
    out.license_id = [0; 128];
    let id = license_id.unwrap_or_default();
    for (dst, src) in out.license_id.iter_mut().zip(id.bytes().take(127)) {
        *dst = src as c_char;
    }
}

/// A client answering checks from memory (opaque): see `kooagent_cached_open`.
pub struct KooagentCachedClient {
    inner: CachedClient,
    /// [`FORKS`] when it was opened.
    forks: u64,
}

/// How many times this process image went through fork() (counted in the child).
static FORKS: AtomicU64 = AtomicU64::new(0);
static AT_FORK: Once = Once::new();

extern "C" {
    // In every libc (POSIX); declared here rather than taking a crate for one function.
    fn pthread_atfork(
        prepare: Option<unsafe extern "C" fn()>,
        parent: Option<unsafe extern "C" fn()>,
        child: Option<unsafe extern "C" fn()>,
    ) -> c_int;
}

unsafe extern "C" fn forked_child() {
    FORKS.fetch_add(1, Ordering::SeqCst);
}

/// Opens a client whose `kooagent_cached_check` answers from memory: a background thread
/// subscribes to the agent's `watch` stream and keeps the verdict table the agent sends at
/// every change (docs/integration.md says how fresh it is). `socket_path` as in
/// `kooagent_open`. Returns at once; until the first table arrives (and whenever the agent
/// is away) checks go over the socket like `kooagent_check`. Thread-safe. Not fork-safe:
/// open it in the process that checks (after fork()); a handle inherited through fork()
/// answers KOOAGENT_STATUS_ERR_FORKED. Returns NULL only when `socket_path` is not UTF-8.
/// Free with `kooagent_cached_close`.
#[no_mangle]
pub unsafe extern "C" fn kooagent_cached_open(
    socket_path: *const c_char,
) -> *mut KooagentCachedClient {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let path = match opt_str_arg(socket_path, "socket_path") {
            Ok(Some(p)) => PathBuf::from(p),
            Ok(None) => kooagent_client::default_socket_path(),
            Err(_) => return std::ptr::null_mut(),
        };
        AT_FORK.call_once(|| {
            // SAFETY: registers a handler that only bumps an atomic counter.
            unsafe { pthread_atfork(None, None, Some(forked_child)) };
        });
        Box::into_raw(Box::new(KooagentCachedClient {
            inner: CachedClient::new(path),
            forks: FORKS.load(Ordering::SeqCst),
        }))
    }));
    r.unwrap_or(std::ptr::null_mut())
}

/// Closes a cached client and stops its thread. NULL is allowed. In a process forked after
/// it was opened it only forgets it (the thread is not there to stop).
#[no_mangle]
pub unsafe extern "C" fn kooagent_cached_close(client: *mut KooagentCachedClient) {
    if client.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let b = Box::from_raw(client);
        if b.forks == FORKS.load(Ordering::SeqCst) {
            drop(b);
        } else {
            // Its locks may be held by threads that exist only in the parent.
            std::mem::forget(b);
        }
    }));
}

fn with_cached(
    c: *mut KooagentCachedClient,
    f: impl FnOnce(&CachedClient) -> KooagentStatus,
) -> KooagentStatus {
    if c.is_null() {
        return fail(KooagentStatus::ErrInvalidArgument, "client is NULL");
    }
    // SAFETY: a non-NULL handle came from kooagent_cached_open and is not closed (contract).
    let client = unsafe { &*c };
    if client.forks != FORKS.load(Ordering::SeqCst) {
        return fail(
            KooagentStatus::ErrForked,
            "this cached client was opened before fork(): open a new one in this process",
        );
    }
    f(&client.inner)
}

/// `kooagent_check` from memory: the same answer, without a round trip when the cache holds
/// the product's licenses; otherwise (agent away, a product with no license file, the device
/// identity not known yet) over the socket, with the same errors as `kooagent_check`.
#[no_mangle]
pub unsafe extern "C" fn kooagent_cached_check(
    client: *mut KooagentCachedClient,
    product: *const c_char,
    feature: *const c_char,
    out: *mut KooagentCheck,
) -> KooagentStatus {
    guard(|| {
        let product = match str_arg(product, "product") {
            Ok(p) => p,
            Err(s) => return s,
        };
        let feature = match opt_str_arg(feature, "feature") {
            Ok(f) => f,
            Err(s) => return s,
        };
        if out.is_null() {
            return fail(KooagentStatus::ErrInvalidArgument, "out is NULL");
        }
        with_cached(client, |c| match c.check(product, feature) {
            Ok(v) => {
                // SAFETY: out is non-NULL and points to a KooagentCheck (contract).
                let out = &mut *out;
                fill_check(out, v.state(), v.allowed, v.days_left, v.license_id());
                KooagentStatus::Ok
            }
            Err(e) => from_client_error(e),
        })
    })
}

/// 1 when the cached client holds the agent's current table (checks are answered from
/// memory), 0 when its stream is down or not up yet (checks go over the socket), or on a
/// NULL or forked handle.
#[no_mangle]
pub unsafe extern "C" fn kooagent_cached_is_live(client: *mut KooagentCachedClient) -> c_int {
    let r = catch_unwind(AssertUnwindSafe(|| {
        if client.is_null() {
            return 0;
        }
        let c = &*client;
        c_int::from(c.forks == FORKS.load(Ordering::SeqCst) && c.inner.is_live())
    }));
    r.unwrap_or(0)
}

/// Records usage of `meter`; `value` is a decimal string such as "1.5". Returns once the
/// agent has made it durable.
#[no_mangle]
pub unsafe extern "C" fn kooagent_record_usage(
    client: *mut KooagentClient,
    meter: *const c_char,
    value: *const c_char,
) -> KooagentStatus {
    guard(|| {
        let (meter, value) = match (str_arg(meter, "meter"), str_arg(value, "value")) {
            (Ok(m), Ok(v)) => (m, v),
            (Err(s), _) | (_, Err(s)) => return s,
        };
        with_client(client, |c| match c.record_usage(meter, value) {
            Ok(_) => KooagentStatus::Ok,
            Err(e) => from_client_error(e),
        })
    })
}

/// Writes the device identification code (NUL-terminated, 25 bytes with the NUL) into
/// `buf` of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kooagent_device_code(
    client: *mut KooagentClient,
    buf: *mut c_char,
    len: usize,
) -> KooagentStatus {
    guard(|| {
        if buf.is_null() {
            return fail(KooagentStatus::ErrInvalidArgument, "buf is NULL");
        }
        with_client(client, |c| match c.device_code() {
            Ok(d) => copy_out(&d.code, buf, len),
            Err(e) => from_client_error(e),
        })
    })
}

unsafe fn copy_out(s: &str, buf: *mut c_char, len: usize) -> KooagentStatus {
    if s.len() + 1 > len {
        return fail(
            KooagentStatus::ErrBufferTooSmall,
            format!("need {} bytes, buffer has {len}", s.len() + 1),
        );
    }
    std::ptr::copy_nonoverlapping(s.as_ptr() as *const c_char, buf, s.len());
    *buf.add(s.len()) = 0;
    KooagentStatus::Ok
}

/// Any operation (listed at the top of this header): `params_json` is a JSON object (NULL =
/// `{}`); on success `*result_json` receives the result as a JSON string to release with
/// `kooagent_string_free`.
#[no_mangle]
pub unsafe extern "C" fn kooagent_call(
    client: *mut KooagentClient,
    op: *const c_char,
    params_json: *const c_char,
    result_json: *mut *mut c_char,
) -> KooagentStatus {
    guard(|| {
        let op = match str_arg(op, "op") {
            Ok(o) => o,
            Err(s) => return s,
        };
        let params = match params_arg(params_json) {
            Ok(p) => p,
            Err(s) => return s,
        };
        if result_json.is_null() {
            return fail(KooagentStatus::ErrInvalidArgument, "result_json is NULL");
        }
        with_client(client, |c| match c.call(op, params) {
            Ok(v) => {
                let text = CString::new(v.to_string()).unwrap_or_default();
                *result_json = text.into_raw();
                KooagentStatus::Ok
            }
            Err(e) => from_client_error(e),
        })
    })
}

/// Releases a string returned by this library. NULL is allowed.
#[no_mangle]
pub unsafe extern "C" fn kooagent_string_free(s: *mut c_char) {
    if !s.is_null() {
        drop(CString::from_raw(s));
    }
}

/// The message of this thread's last error ("" after a success). Valid until the next call
/// on this thread; do not free.
#[no_mangle]
pub extern "C" fn kooagent_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Called for each event of `kooagent_watch` with the event as JSON. Return 0 to continue,
/// anything else to stop watching.
pub type KooagentWatchCallback =
    Option<unsafe extern "C" fn(event_json: *const c_char, userdata: *mut c_void) -> c_int>;

/// Streams state changes (`watch`) to `callback` on the calling thread until the callback
/// returns non-zero (then returns OK) or an error occurs. Reconnects and re-subscribes when
/// the agent restarts. `socket_path` and `params_json` may be NULL.
#[no_mangle]
pub unsafe extern "C" fn kooagent_watch(
    socket_path: *const c_char,
    params_json: *const c_char,
    callback: KooagentWatchCallback,
    userdata: *mut c_void,
) -> KooagentStatus {
    guard(|| {
        let Some(cb) = callback else {
            return fail(KooagentStatus::ErrInvalidArgument, "callback is NULL");
        };
        let path = match opt_str_arg(socket_path, "socket_path") {
            Ok(Some(p)) => PathBuf::from(p),
            Ok(None) => kooagent_client::default_socket_path(),
            Err(s) => return s,
        };
        let params = match params_arg(params_json) {
            Ok(p) => p,
            Err(s) => return s,
        };
        let mut watch = match Client::new(path).watch(params) {
            Ok(w) => w,
            Err(e) => return from_client_error(e),
        };
        loop {
            match watch.next_event() {
                Ok(ev) => {
                    let text = CString::new(ev.to_string()).unwrap_or_default();
                    if cb(text.as_ptr(), userdata) != 0 {
                        return KooagentStatus::Ok;
                    }
                }
                Err(e) => return from_client_error(e),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_up_to_date() {
        let crate_dir = env!("CARGO_MANIFEST_DIR");
        let mut config = cbindgen::Config::from_file(format!("{crate_dir}/cbindgen.toml")).unwrap();
        // The operations `kooagent_call` can name, from the protocol catalogue: the header
        // goes stale (and this test fails) when an operation is added or changes.
        config.after_includes = Some(format!(
            "\n// Operations of the agent (protocol v{}, docs/protocol.md), for `kooagent_call`.\n\
             // Read-only ones are sent again after a reconnect; the others report\n\
             // KOOAGENT_STATUS_ERR_CONNECTION_LOST when the connection broke after sending.\n{}",
            kooagent_client::PROTOCOL_VERSION,
            kooagent_client::catalogue::listing("//   ").trim_end()
        ));
        let mut out = Vec::new();
        cbindgen::Builder::new()
            .with_crate(crate_dir)
            .with_config(config)
            .generate()
            .expect("cbindgen")
            .write(&mut out);
        let path = format!("{crate_dir}/include/kooagent.h");
        if std::env::var_os("UPDATE_HEADER").is_some() {
            std::fs::write(&path, &out).unwrap();
        }
        let checked_in = std::fs::read(&path).unwrap_or_default();
        assert!(
            checked_in == out,
            "include/kooagent.h is stale: run `UPDATE_HEADER=1 cargo test -p kooagent-ffi header`"
        );
    }

    #[test]
    fn null_arguments_are_errors_not_crashes() {
        unsafe {
            let mut check = std::mem::zeroed::<KooagentCheck>();
            assert_eq!(
                kooagent_check(
                    std::ptr::null_mut(),
                    c"p".as_ptr(),
                    std::ptr::null(),
                    &mut check
                ),
                KooagentStatus::ErrInvalidArgument
            );
            let c = kooagent_open(c"/nonexistent/kooagent.sock".as_ptr());
            assert!(!c.is_null());
            assert_eq!(
                kooagent_check(c, std::ptr::null(), std::ptr::null(), &mut check),
                KooagentStatus::ErrInvalidArgument
            );
            let msg = CStr::from_ptr(kooagent_last_error()).to_str().unwrap();
            assert!(msg.contains("product"), "{msg}");
            kooagent_set_timeout_ms(c, 100);
            let mut buf = [0 as c_char; 32];
            let s = kooagent_device_code(c, buf.as_mut_ptr(), buf.len());
            assert_eq!(s, KooagentStatus::ErrConnect);
            kooagent_close(c);
            kooagent_close(std::ptr::null_mut());

            assert_eq!(
                kooagent_cached_check(
                    std::ptr::null_mut(),
                    c"p".as_ptr(),
                    std::ptr::null(),
                    &mut check
                ),
                KooagentStatus::ErrInvalidArgument
            );
            let c = kooagent_cached_open(c"/nonexistent/kooagent.sock".as_ptr());
            assert!(!c.is_null());
            assert_eq!(kooagent_cached_is_live(c), 0);
            assert_eq!(
                kooagent_cached_check(c, c"p".as_ptr(), std::ptr::null(), std::ptr::null_mut()),
                KooagentStatus::ErrInvalidArgument
            );
            kooagent_cached_close(c);
            kooagent_cached_close(std::ptr::null_mut());
        }
    }
}
