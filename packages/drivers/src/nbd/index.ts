/**
 * `@blk/drivers/nbd`: the NBD protocol as a sans-IO codec (`protocol/`), and a server exporting any
 * block node (`server/`), and the client (`client/`): `NbdClient`, the `nbd` driver, NBD URIs.
 */

export * from "./client/index.ts";
export * from "./protocol/index.ts";
export * from "./server/index.ts";
