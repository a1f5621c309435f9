/** blkd's own version (from its package.json) and the QEMU version whose behaviour it follows. */
import { readFileSync } from "node:fs";

/** The version of `@blk/daemon`, read from its package.json (works from `src/` and `dist/`). */
export const BLKD_VERSION: string = (() => {
  try {
    const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as {
      version?: unknown;
    };
    return typeof pkg.version === "string" ? pkg.version : "0.0.0";
  } catch {
    return "0.0.0";
  }
})();

/** What the QMP greeting and `query-version` report: QEMU 7.2.0, package `blk <version>`. */
export const QMP_VERSION: { qemu: { micro: number; minor: number; major: number }; package: string } = {
  qemu: { micro: 0, minor: 2, major: 7 },
  package: `blk ${BLKD_VERSION}`,
};
