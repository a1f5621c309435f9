/** blkd's own version (from its package.json) and the QEMU version whose behaviour it follows. */
import { readFileSync } from "node:fs";

/**
 * The version of `@blk/daemon`, read from its package.json: the nearest one above this module named
 * `@blk/daemon` (from `src/`, `dist/`, or a bundle a few levels down).
 */
export const BLKD_VERSION: string = (() => {
  for (const rel of ["../package.json", "../../package.json", "../../../package.json"]) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(rel, import.meta.url), "utf8")) as {
        name?: unknown;
        version?: unknown;
      };
      if (pkg.name === "@blk/daemon" && typeof pkg.version === "string") return pkg.version;
    } catch {
      // not there
    }
  }
  return "0.0.0";
})();

/** What the QMP greeting and `query-version` report: QEMU 7.2.0, package `blk <version>`. */
export const QMP_VERSION: { qemu: { micro: number; minor: number; major: number }; package: string } = {
  qemu: { micro: 0, minor: 2, major: 7 },
  package: `blk ${BLKD_VERSION}`,
};
