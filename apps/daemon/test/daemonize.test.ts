/**
 * `--daemonize` and `--pidfile` with real processes: the parent returns only once the daemon is up, a
 * failing option makes it exit 1 with the message, the pid file is locked while the daemon runs and
 * removed when it quits.
 */
import { existsSync, readFileSync, readlinkSync, statSync, writeFileSync } from "node:fs";
import { QmpClient } from "@blk/qmp";
import { makeTempDir, run } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { alive, BLKD, BUILT, Daemons, errorLines, until } from "./daemonize-helpers.ts";

if (!BUILT) console.log("daemonize.test: skipped, apps/daemon/dist/main.js not built (pnpm build)");

const blkd = (args: readonly string[]) => run(process.execPath, [BLKD, ...args], { timeoutMs: 30_000 });

describe.skipIf(!BUILT)("blkd --daemonize", () => {
  it("returns once monitor, export and pid file are up; quit ends the daemon and removes the pid file", async () => {
    await using dir = makeTempDir("blkd-daemonize");
    await using daemons = new Daemons();
    const img = dir.join("disk.img");
    writeFileSync(img, Buffer.alloc(1 << 20));
    const pidfile = dir.join("blkd.pid");
    const qmpSock = dir.join("qmp.sock");
    const nbdSock = dir.join("nbd.sock");
    const r = await blkd([
      "--daemonize",
      "--blockdev",
      `driver=file,node-name=f,filename=${img}`,
      "--blockdev",
      "driver=raw,node-name=disk,file=f",
      "--nbd-server",
      `addr.type=unix,addr.path=${nbdSock}`,
      "--export",
      "type=nbd,id=e0,node-name=disk,name=disk",
      "--chardev",
      `socket,id=m0,path=${qmpSock},server=on,wait=off`,
      "--monitor",
      "chardev=m0",
      "--pidfile",
      pidfile,
    ]);
    const pid = daemons.track(pidfile);
    expect(r.code, r.stderr).toBe(0);
    expect(errorLines(r.stderr)).toEqual([]);
    // Everything exists the moment the parent has exited: no waiting.
    expect(pid).toBeGreaterThan(0);
    expect(readFileSync(pidfile, "utf8")).toBe(`${pid}\n`);
    expect(statSync(pidfile).mode & 0o777).toBe(0o600);
    expect(existsSync(qmpSock)).toBe(true);
    expect(existsSync(nbdSock)).toBe(true);
    expect(alive(pid as number)).toBe(true);
    expect(readlinkSync(`/proc/${pid}/cwd`)).toBe("/");
    expect(readlinkSync(`/proc/${pid}/fd/0`)).toBe("/dev/null");

    // The pid file is locked: a second daemon is refused and leaves it alone.
    const second = await blkd(["--pidfile", pidfile]);
    expect(second.code).toBe(1);
    expect(errorLines(second.stderr)).toEqual([
      "blkd: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable",
    ]);
    expect(readFileSync(pidfile, "utf8")).toBe(`${pid}\n`);

    const qmp = await QmpClient.connect({ path: qmpSock }, { timeoutMs: 10_000 });
    expect(await qmp.execute("query-block-exports")).toEqual([
      { id: "e0", type: "nbd", "node-name": "disk", "shutting-down": false },
    ]);
    await qmp.execute("quit");
    await qmp.close();
    await until(() => !alive(pid as number), "the daemon to exit");
    expect(existsSync(pidfile)).toBe(false);
    expect(existsSync(qmpSock)).toBe(false);
  });

  it("a failing option: the parent exits 1 with the message and no daemon is left", async () => {
    await using dir = makeTempDir("blkd-daemonize");
    await using daemons = new Daemons();
    const pidfile = dir.join("blkd.pid");
    const missing = dir.join("missing.img");
    const r = await blkd([
      "--daemonize",
      "--pidfile",
      pidfile,
      "--blockdev",
      `driver=file,node-name=f,filename=${missing}`,
    ]);
    daemons.track(pidfile);
    expect(r.code).toBe(1);
    expect(errorLines(r.stderr)).toEqual([
      `blkd: --blockdev driver=file,node-name=f,filename=${missing}: Could not open '${missing}': No such file or directory`,
    ]);
    expect(existsSync(pidfile)).toBe(false);
  });

  it("an unusable pid file: the parent exits 1 with QEMU's message", async () => {
    await using dir = makeTempDir("blkd-daemonize");
    await using daemons = new Daemons();
    const pidfile = dir.join("no-such-dir", "blkd.pid");
    const r = await blkd(["--daemonize", "--pidfile", pidfile, "--blockdev", "null-co,node-name=n"]);
    daemons.track(pidfile);
    expect(r.code).toBe(1);
    expect(errorLines(r.stderr)).toEqual([
      `blkd: cannot create PID file: Could not create '${pidfile}': No such file or directory`,
    ]);
  });

  it("--help, --version and usage errors are answered by the parent, nothing is started", async () => {
    const v = await blkd(["--daemonize", "--version"]);
    expect(v.code).toBe(0);
    expect(v.stdout).toMatch(/^blkd version /);
    const u = await blkd(["--daemonize", "--bogus"]);
    expect(u.code).toBe(1);
    expect(u.stderr).toBe("blkd: unrecognized option '--bogus'\n");
  });
});
