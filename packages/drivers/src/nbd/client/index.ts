/** The NBD client: {@link NbdClient} (one connection), the `nbd` protocol driver, and NBD URIs. */
export {
  type NbdBlockStatusFlags,
  NbdClient,
  type NbdClientOptions,
  type NbdFuaFlags,
  type NbdReadFlags,
  type NbdServerAddress,
  type NbdStatusExtent,
  type NbdZeroFlags,
} from "./client.ts";
export {
  makeNbdDriver,
  NBD_MAX_MULTI_CONN,
  type NbdDriverConfig,
  type NbdOptions,
  NbdState,
  nbdDriver,
  nbdSchema,
  registerNbd,
  tlsCredentials,
} from "./driver.ts";
export { formatNbdUri, type NbdUriOptions, parseNbdUri } from "./uri.ts";
