/**
 * `--daemonize` and `--pidfile` side by side with qemu-storage-daemon: same exit codes and messages for
 * failures, the same pid file life cycle, and each daemon's pid-file lock seen by the other.
 */
import { existsSync, readFileSync } from "node:fs";
import { QmpClient } from "@blk/qmp";
import { makeTempDir, missingPeers, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { alive, BLKD, BUILT, Daemons, errorLines, until } from "./daemonize-helpers.ts";

const missing = missingPeers(["qemu-storage-daemon"]);
if (missing.length > 0) console.log(`daemonize.qemu.test: skipped, missing ${missing.join(", ")}`);
if (!BUILT) console.log("daemonize.qemu.test: skipped, apps/daemon/dist/main.js not built (pnpm build)");

type Prog = "blkd" | "qemu-storage-daemon";
const PROGS: readonly Prog[] = ["blkd", "qemu-storage-daemon"];

function start(prog: Prog, args: readonly string[]) {
  return prog === "blkd"
    ? run(process.execPath, [BLKD, ...args], { timeoutMs: 30_000 })
    : run("qemu-storage-daemon", args, { timeoutMs: 30_000 });
}

/** The error lines with the program name masked. */
const masked = (stderr: string): string[] =>
  errorLines(stderr).map((l) => l.replace(/^(blkd|qemu-storage-daemon): /, "PROG: "));

describe.skipIf(missing.length > 0 || !BUILT)(
  "--daemonize vs qemu-storage-daemon",
  { tags: ["qemu"] },
  () => {
    it("up, pid file written, quit removes it — for both", async () => {
      await using dir = makeTempDir("blkd-daemonize");
      await using daemons = new Daemons();
      for (const prog of PROGS) {
        const pidfile = dir.join(`${prog}.pid`);
        const sock = dir.join(`${prog}.qmp`);
        const r = await start(prog, [
          "--daemonize",
          "--chardev",
          `socket,id=m0,path=${sock},server=on,wait=off`,
          "--monitor",
          "chardev=m0",
          "--blockdev",
          "null-co,node-name=n",
          "--pidfile",
          pidfile,
        ]);
        const pid = daemons.track(pidfile);
        expect(r.code, `${prog}: ${r.stderr}`).toBe(0);
        expect(masked(r.stderr)).toEqual([]);
        expect(readFileSync(pidfile, "utf8")).toMatch(/^\d+\n$/);
        expect(alive(pid as number)).toBe(true);
        const qmp = await QmpClient.connect({ path: sock }, { timeoutMs: 10_000 });
        expect(await qmp.execute<{ "node-name": string }[]>("query-named-block-nodes")).toMatchObject([
          { "node-name": "n" },
        ]);
        await qmp.execute("quit");
        await qmp.close();
        await until(() => !alive(pid as number), `${prog} to exit`);
        expect(existsSync(pidfile), prog).toBe(false);
      }
    });

    it("a failing option and an unusable pid file: exit 1 and the same message", async () => {
      await using dir = makeTempDir("blkd-daemonize");
      await using daemons = new Daemons();
      const img = dir.join("missing.img");
      // A daemon that wrongly started is found by its pid file and killed.
      const pidfile = dir.join("x.pid");
      const cases: string[][] = [
        ["--daemonize", "--pidfile", pidfile, "--blockdev", `driver=file,node-name=f,filename=${img}`],
        ["--daemonize", "--pidfile", pidfile, "--blockdev", "null-co,node-name=n,bogus=1"],
        ["--daemonize", "--pidfile", dir.join("no-dir", "x.pid"), "--blockdev", "null-co,node-name=n"],
        ["--daemonize", "--bogus"],
      ];
      for (const args of cases) {
        const out: Record<string, { code: number | null; lines: string[] }> = {};
        for (const prog of PROGS) {
          const r = await start(prog, args);
          daemons.track(pidfile);
          out[prog] = { code: r.code, lines: masked(r.stderr) };
        }
        expect(out.blkd, args.join(" ")).toEqual(out["qemu-storage-daemon"]);
        expect(out.blkd?.code).toBe(1);
        expect(out.blkd?.lines).toHaveLength(1);
      }
    });

    it("each refuses a pid file the other holds, with the same message", async () => {
      await using dir = makeTempDir("blkd-daemonize");
      await using daemons = new Daemons();
      for (const [holder, other] of [PROGS, [...PROGS].reverse()] as [Prog, Prog][]) {
        const pidfile = dir.join(`${holder}.pid`);
        const sock = dir.join(`${holder}.qmp`);
        const r = await start(holder, [
          "--daemonize",
          "--chardev",
          `socket,id=m0,path=${sock},server=on,wait=off`,
          "--monitor",
          "chardev=m0",
          "--pidfile",
          pidfile,
        ]);
        const pid = daemons.track(pidfile);
        expect(r.code, r.stderr).toBe(0);
        const refused = await start(other, ["--daemonize", "--pidfile", pidfile]);
        expect(refused.code, other).toBe(1);
        expect(masked(refused.stderr), other).toEqual([
          "PROG: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable",
        ]);
        expect(readFileSync(pidfile, "utf8")).toBe(`${pid}\n`);
        const qmp = await QmpClient.connect({ path: sock }, { timeoutMs: 10_000 });
        await qmp.execute("quit");
        await qmp.close();
        await until(() => !alive(pid as number), `${holder} to exit`);
        expect(existsSync(pidfile)).toBe(false);
      }
    });
  },
);
