import { existsSync, writeFileSync } from "node:fs";
import { QmpClient } from "@blk/qmp";
import { makeTempDir, waitForPath } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { createDaemon, type MainIo, main } from "../src/index.ts";

const MiB = 1 << 20;

function captureIo(): MainIo & { stdout: string; stderr: string; signal(name: string): void } {
  const listeners = new Set<(s: string) => void>();
  const io = {
    stdout: "",
    stderr: "",
    out(t: string) {
      io.stdout += t;
    },
    err(t: string) {
      io.stderr += t;
    },
    onSignal(fn: (s: string) => void) {
      listeners.add(fn);
      return () => listeners.delete(fn);
    },
    signal(name: string) {
      for (const l of listeners) l(name);
    },
  };
  return io;
}

/** The non-JSON (error) lines of stderr. */
const errorLines = (stderr: string): string[] =>
  stderr.split("\n").filter((l) => l !== "" && !l.startsWith("{"));

describe("blkd command line", () => {
  it("--help and --version", async () => {
    const io = captureIo();
    expect(await main(["--help"], io)).toBe(0);
    expect(io.stdout).toContain("--blockdev");
    expect(io.stdout).toContain("--nbd-server");
    const io2 = captureIo();
    expect(await main(["-V"], io2)).toBe(0);
    expect(io2.stdout).toMatch(/^blkd version \d+\.\d+\.\d+/);
    const io3 = captureIo();
    expect(await main(["--object", "help"], io3)).toBe(0);
    expect(io3.stdout).toContain("throttle-group");
  });

  it.each([
    [["--foo"], "blkd: unrecognized option '--foo'"],
    [["--blockdev"], "blkd: option '--blockdev' requires an argument"],
    [["extra"], "blkd: extra: Unexpected argument"],
    [["--pidfile"], "blkd: option '--pidfile' requires an argument"],
    [
      ["--blockdev", "driver=qcow2,node-name=x"],
      "blkd: --blockdev driver=qcow2,node-name=x: Parameter 'file' is missing",
    ],
    [["--blockdev", "null-co"], "blkd: --blockdev null-co: 'node-name' must be specified for the root node"],
    [
      ["--blockdev", "null-co,node-name=n", "--blockdev", "null-co,node-name=n"],
      "blkd: --blockdev null-co,node-name=n: Duplicate nodes with node-name='n'",
    ],
    [
      ["--blockdev", "driver=raw,node-name=r,file=nosuch"],
      "blkd: --blockdev driver=raw,node-name=r,file=nosuch: Cannot find device='nosuch' nor node-name='nosuch'",
    ],
    [
      ["--export", "type=nbd,id=e,node-name=x"],
      "blkd: --export type=nbd,id=e,node-name=x: Cannot find device='' nor node-name='x'",
    ],
    [
      ["--blockdev", "null-co,node-name=n", "--export", "type=nbd,id=e,node-name=n"],
      "blkd: --export type=nbd,id=e,node-name=n: NBD server not running",
    ],
    [
      ["--nbd-server", "addr.type=inet,addr.host=127.0.0.1"],
      "blkd: --nbd-server addr.type=inet,addr.host=127.0.0.1: Parameter 'addr.port' is missing",
    ],
    [
      ["--nbd-server", "addr.type=unix"],
      "blkd: --nbd-server addr.type=unix: Parameter 'addr.path' is missing",
    ],
    [
      ["--object", "bogus,id=x"],
      "blkd: --object bogus,id=x: Parameter 'qom-type' does not accept value 'bogus'",
    ],
    [["--object", "throttle-group"], "blkd: --object throttle-group: Parameter 'id' is missing"],
    [
      ["--object", "throttle-group,id=t,x-bps-total=-1"],
      "blkd: --object throttle-group,id=t,x-bps-total=-1: Property values cannot be negative",
    ],
    [["--monitor", "chardev=nosuch"], 'blkd: --monitor chardev=nosuch: chardev "nosuch" not found'],
    [["--chardev", "socket,id=m"], "blkd: --chardev socket,id=m: Unable to parse FD number"],
  ])("bad option %j exits 1 with QEMU's message", async (argv, message) => {
    const io = captureIo();
    expect(await main(argv, io)).toBe(1);
    expect(errorLines(io.stderr)).toEqual([message]);
  });

  it("a monitor refuses mode=readline", async () => {
    await using dir = makeTempDir("blkd");
    const io = captureIo();
    const argv = [
      "--chardev",
      `socket,id=m,path=${dir.join("q.sock")},server=on,wait=off`,
      "--monitor",
      "m,mode=readline",
    ];
    expect(await main(argv, io)).toBe(1);
    expect(errorLines(io.stderr)).toEqual(["blkd: --monitor m,mode=readline: Only QMP is supported"]);
  });

  it("runs the transcripts §4 configuration until quit, with a pidfile and JSON logs", async () => {
    await using dir = makeTempDir("blkd");
    const disk = dir.join("disk.img");
    writeFileSync(disk, Buffer.alloc(4 * MiB));
    const sock = dir.join("qmp.sock");
    const pid = dir.join("blkd.pid");
    const io = captureIo();
    const running = main(
      [
        "--chardev",
        `socket,path=${sock},server=on,wait=off,id=m`,
        "--monitor",
        "chardev=m",
        "--blockdev",
        `driver=file,node-name=disk-file,filename=${disk}`,
        "--blockdev",
        "driver=raw,node-name=disk,file=disk-file",
        "--object",
        "throttle-group,id=tg0,x-bps-total=10485760,x-iops-total=1000",
        "--blockdev",
        '{"driver":"throttle","node-name":"disk-thr","throttle-group":"tg0","file":"disk"}',
        "--nbd-server",
        `addr.type=unix,addr.path=${dir.join("nbd.sock")},max-connections=4`,
        "--export",
        "type=nbd,id=exp0,node-name=disk-thr,name=disk,writable=on",
        "--pidfile",
        pid,
      ],
      io,
    );
    await waitForPath(pid);
    expect(existsSync(dir.join("nbd.sock"))).toBe(true);
    await using qmp = await QmpClient.connect({ path: sock });
    expect(await qmp.execute("query-block-exports")).toEqual([
      { id: "exp0", type: "nbd", "node-name": "disk-thr", "shutting-down": false },
    ]);
    expect(await qmp.execute("qom-get", { path: "/objects/tg0", property: "limits" })).toMatchObject({
      "bps-total": 10485760,
      "iops-total": 1000,
      "iops-total-max-length": 1,
    });
    const graph = await qmp.execute<{ nodes: { name: string; type: string }[]; edges: { name: string }[] }>(
      "x-debug-query-block-graph",
    );
    expect(graph.nodes.map((n) => `${n.type}:${n.name}`).sort()).toEqual([
      "block-backend:",
      "block-driver:disk",
      "block-driver:disk-file",
      "block-driver:disk-thr",
    ]);
    expect(graph.edges.map((e) => e.name).sort()).toEqual(["file", "file", "root"]);
    const mark = qmp.eventMark();
    await qmp.execute("quit");
    expect((await qmp.waitEvent("BLOCK_EXPORT_DELETED", { since: mark })).data).toEqual({ id: "exp0" });
    expect(await running).toBe(0);
    expect(existsSync(pid)).toBe(false);
    expect(existsSync(sock)).toBe(false);
    const logs = io.stderr
      .split("\n")
      .filter((l) => l !== "")
      .map((l) => JSON.parse(l) as { level: string; msg: string });
    expect(logs.map((l) => l.msg)).toContain("started");
    expect(logs.at(-1)?.msg).toBe("shut down");
  });

  it("SIGTERM shuts down cleanly", async () => {
    await using dir = makeTempDir("blkd");
    const pid = dir.join("p.pid");
    const io = captureIo();
    const running = main(["--blockdev", "null-co,node-name=n", "--pidfile", pid], io);
    await waitForPath(pid);
    io.signal("SIGTERM");
    expect(await running).toBe(0);
    expect(existsSync(pid)).toBe(false);
    expect(io.stderr).toContain('"reason":"SIGTERM"');
  });

  it("createDaemon applies options programmatically, with the same messages", async () => {
    await using d = await createDaemon({
      options: [
        ["blockdev", "null-co,node-name=n,size=1048576"],
        ["object", '{"qom-type":"throttle-group","id":"tg0","limits":{"iops-total":500}}'],
        ["blockdev", "throttle,node-name=t,throttle-group=tg0,file=n"],
      ],
    });
    expect([...d.graph.nodes.keys()].sort()).toEqual(["n", "t"]);
    expect(d.graph.find("n")?.length).toBe(MiB);
    await d.apply("object", "throttle-group,id=tg1,limits.bps-total=1000");
    expect(await d.execute("qom-get", { path: "/objects/tg1", property: "x-bps-total" })).toBe(1000);
    await expect(createDaemon({ options: [["blockdev", "null-co"]] })).rejects.toMatchObject({
      errorClass: "GenericError",
      desc: "--blockdev null-co: 'node-name' must be specified for the root node",
    });
  });
});
