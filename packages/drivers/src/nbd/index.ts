/**
 * `@blk/drivers/nbd`: the NBD protocol as a sans-IO codec (`protocol/`), and a server exporting any
 * block node (`server/`), and the client (`client/`): `NbdClient`, the `nbd` driver, NBD URIs; TLS
 * credentials in QEMU's layout for both (`tls.ts`).
 */

export * from "./client/index.ts";
export * from "./protocol/index.ts";
export * from "./server/index.ts";
export {
  TlsCreds,
  type TlsCredsOptions,
  type TlsCredsPskOptions,
  type TlsCredsX509Options,
  type TlsEndpoint,
  tlsHandshakeError,
} from "./tls.ts";
