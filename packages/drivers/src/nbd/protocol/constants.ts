/**
 * NBD protocol constants (values are protocol facts).
 *
 * References: NetworkBlockDevice/nbd `doc/proto.md` — "Newstyle negotiation", "Option types",
 * "Option reply types", "Transmission flags", "Request types", "Command flags", "Structured reply
 * types", "Error values", "Metadata querying"; qemu `docs/interop/nbd.rst` for the `qemu:` namespace.
 * All integers on the wire are big-endian.
 */

/** "NBDMAGIC": first 8 bytes the server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": second 8 bytes of the greeting and the prefix of every option request. */
export const NBD_IHAVEOPT = 0x49484156454f5054n;
/** Magic of every option reply. */
export const NBD_REP_MAGIC = 0x0003e889045565a9n;
/** Magic of a (compact) transmission request. */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** Magic of a simple reply. */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** Magic of a structured reply chunk. */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** Magic of an extended request (extension; not spoken by this implementation). */
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71;

/** Handshake flags (16 bits, server → client). */
export const NBD_FLAG = {
  FIXED_NEWSTYLE: 0x0001,
  NO_ZEROES: 0x0002,
} as const;

/** Client flags (32 bits, client → server). */
export const NBD_FLAG_C = {
  FIXED_NEWSTYLE: 0x00000001,
  NO_ZEROES: 0x00000002,
} as const;

/** Option codes. */
export const NBD_OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

/** Option reply types; errors have bit 31 set. */
export const NBD_REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
  ERR_EXT_HEADER_REQD: 0x8000000a,
} as const;

/** Bit 31 of an option reply type: the reply is an error. */
export const NBD_REP_FLAG_ERROR = 0x80000000;

/** Information types inside `NBD_REP_INFO` (and requested by INFO/GO). */
export const NBD_INFO = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Transmission flags (16 bits). */
export const NBD_TFLAG = {
  HAS_FLAGS: 0x0001,
  READ_ONLY: 0x0002,
  SEND_FLUSH: 0x0004,
  SEND_FUA: 0x0008,
  ROTATIONAL: 0x0010,
  SEND_TRIM: 0x0020,
  SEND_WRITE_ZEROES: 0x0040,
  SEND_DF: 0x0080,
  CAN_MULTI_CONN: 0x0100,
  SEND_RESIZE: 0x0200,
  SEND_CACHE: 0x0400,
  SEND_FAST_ZERO: 0x0800,
  BLOCK_STATUS_PAYLOAD: 0x1000,
} as const;

/** Request types (commands). */
export const NBD_CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

/** Command flags (16 bits). */
export const NBD_CMD_FLAG = {
  FUA: 0x0001,
  NO_HOLE: 0x0002,
  DF: 0x0004,
  REQ_ONE: 0x0008,
  FAST_ZERO: 0x0010,
  PAYLOAD_LEN: 0x0020,
} as const;

/** Structured reply flags. */
export const NBD_REPLY_FLAG_DONE = 0x0001;

/** Structured reply chunk types; error types have bit 15 set. */
export const NBD_REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;

/** Bit 15 of a chunk type: the chunk reports an error. */
export const NBD_REPLY_TYPE_ERROR_BIT = 0x8000;

/** Wire error values (Linux errno numbers). */
export const NBD_ERR = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** `base:allocation` status bits. */
export const NBD_STATE = {
  HOLE: 1,
  ZERO: 2,
} as const;

/** `qemu:dirty-bitmap:NAME` status bit. */
export const NBD_STATE_DIRTY = 1;

/** Metadata context names. */
export const META_BASE_ALLOCATION = "base:allocation";
/** QEMU's allocation-depth context. */
export const META_QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth";
/** Prefix of QEMU's dirty-bitmap contexts. */
export const META_QEMU_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:";

/** Longest string (export name, description, context name, message) accepted: the spec's MUST limit. */
export const NBD_MAX_STRING = 4096;
/** Largest READ/WRITE payload portable clients send (2^25), our default maximum payload. */
export const NBD_MAX_PAYLOAD = 33_554_432;
/** Default IANA port. */
export const NBD_DEFAULT_PORT = 10809;
/** Length of a compact request header. */
export const NBD_REQUEST_SIZE = 28;
/** Length of a simple reply header. */
export const NBD_SIMPLE_REPLY_SIZE = 16;
/** Length of a structured reply chunk header. */
export const NBD_CHUNK_HEADER_SIZE = 20;
/** Length of an option request header. */
export const NBD_OPTION_HEADER_SIZE = 16;
/** Length of an option reply header. */
export const NBD_OPTION_REPLY_HEADER_SIZE = 20;
/** Length of the server greeting (NBDMAGIC, IHAVEOPT, handshake flags). */
export const NBD_GREETING_SIZE = 18;

const OPT_NAMES: Record<number, string> = {
  1: "export name",
  2: "abort",
  3: "list",
  4: "peek export",
  5: "starttls",
  6: "info",
  7: "go",
  8: "structured reply",
  9: "list meta context",
  10: "set meta context",
  11: "extended headers",
};

/** A readable name for an option code (`<unknown>` when not defined). */
export function optionName(option: number): string {
  return OPT_NAMES[option] ?? "<unknown>";
}

const CMD_NAMES: Record<number, string> = {
  0: "read",
  1: "write",
  2: "disconnect",
  3: "flush",
  4: "trim",
  5: "cache",
  6: "write zeroes",
  7: "block status",
  8: "resize",
};

/** A readable name for a command type (`<unknown>` when not defined). */
export function commandName(type: number): string {
  return CMD_NAMES[type] ?? "<unknown>";
}
