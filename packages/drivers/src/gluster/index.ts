/**
 * QEMU 7.2's gluster URL and option parser: `gluster[+tcp|+unix|+rdma]://…` URLs, the JSON / `server[]`
 * form, QEMU's dispatch between them, its connect-time port check, and the way back to a URL. Every rejection
 * is a {@link GlusterError} (a `BlkError` with code `EINVAL`) carrying QEMU's exact message and hints.
 *
 * @module
 */
export {
  GLUSTER_JSON_USAGE,
  GLUSTER_URI_USAGE,
  GlusterError,
  type GlusterErrorOptions,
} from "./errors.ts";
export { formatGlusterUri } from "./format.ts";
export {
  type BlockdevOptionsGluster,
  GLUSTER_DEFAULT_PORT,
  GLUSTER_PROTOCOLS,
  GLUSTER_RDMA_WARNING,
  type GlusterConnection,
  type GlusterInetServer,
  type GlusterParseOptions,
  type GlusterServer,
  type GlusterUnixServer,
  type GlusterVolfileServer,
  parseGlusterOptions,
  parseGlusterPort,
  parseGlusterUri,
  resolveGlusterConnection,
  validateGlusterOptions,
} from "./parse.ts";
