/**
 * The same scripted QMP scenario against blkd (in-process) and qemu-storage-daemon 7.2, results compared
 * after masking generated node names, on-disk sizes and the temp dir.
 */
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { QmpClient, QmpError } from "@blk/qmp";
import { makeTempDir, missingPeers, spawnPeer, type TempDir, waitForPath } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import { createDaemon } from "../src/index.ts";

const missing = missingPeers(["qemu-storage-daemon", "qemu-img"]);
if (missing.length > 0) console.log(`side-by-side.qemu.test: skipped, missing ${missing.join(", ")}`);

const MiB = 1 << 20;
type Step = [string, Record<string, unknown>?];

function script(dir: string): Step[] {
  return [
    ["query-named-block-nodes"],
    [
      "blockdev-add",
      { driver: "raw", "node-name": "r1", file: { driver: "file", filename: `${dir}/a.img` } },
    ],
    [
      "blockdev-add",
      { driver: "raw", "node-name": "r1", file: { driver: "file", filename: `${dir}/a.img` } },
    ],
    ["blockdev-add", { driver: "raw", "node-name": "1bad", file: "f2" }],
    ["blockdev-add", { driver: "raw", file: "f2" }],
    ["blockdev-add", { driver: "raw", "node-name": "r3" }],
    ["blockdev-add", { driver: "raw", "node-name": "r3", file: "nosuch" }],
    ["blockdev-add", { driver: "raw", "node-name": "r3", file: "f2", bogus: true }],
    ["blockdev-add", { driver: "raw", "node-name": "r3", file: "f2", "read-only": "yes" }],
    ["blockdev-add", { driver: "bogus", "node-name": "r3" }],
    ["query-named-block-nodes", { flat: true }],
    ["block-dirty-bitmap-add", { node: "r1", name: "b0" }],
    ["block-dirty-bitmap-add", { node: "r1", name: "b1", granularity: 4096, disabled: true }],
    ["block-dirty-bitmap-add", { node: "r1", name: "b0" }],
    ["block-dirty-bitmap-add", { node: "r1", name: "bx", granularity: 1000 }],
    ["block-dirty-bitmap-add", { node: "r1", name: "" }],
    ["block-dirty-bitmap-add", { node: "nosuch", name: "b" }],
    ["block-dirty-bitmap-add", { node: "r2", name: "c0" }],
    ["block-dirty-bitmap-merge", { node: "r1", target: "b1", bitmaps: ["b0"] }],
    ["block-dirty-bitmap-merge", { node: "r1", target: "b1", bitmaps: [{ node: "r2", name: "c0" }] }],
    ["block-dirty-bitmap-merge", { node: "r1", target: "b1", bitmaps: ["nosuch"] }],
    ["block-dirty-bitmap-merge", { node: "r1", target: "b1", bitmaps: [{ node: "nosuch", name: "x" }] }],
    ["block-dirty-bitmap-disable", { node: "r1", name: "b0" }],
    ["block-dirty-bitmap-enable", { node: "r1", name: "b1" }],
    ["block-dirty-bitmap-clear", { node: "r1", name: "b1" }],
    ["query-named-block-nodes", { flat: true }],
    ["block-dirty-bitmap-remove", { node: "r1", name: "b0" }],
    ["block-dirty-bitmap-remove", { node: "r1", name: "b0" }],
    ["block-dirty-bitmap-remove", { node: "nosuch", name: "b0" }],
    ["no-such-command"],
    ["block-job-set-speed", { device: "j" }],
    ["block-job-set-speed", { device: "j", speed: "fast" }],
    ["block-job-set-speed", { device: "j", speed: 1, extra: 1 }],
    ["block-job-cancel", { device: 7 }],
    ["block-job-cancel", { device: "nosuch" }],
    ["job-dismiss", { id: "nosuch" }],
    ["query-jobs"],
    ["query-block-jobs"],
    ["query-block"],
    ["query-block-exports"],
    ["object-add", { "qom-type": "throttle-group", id: "tg0", limits: { "iops-total": 100, "bps-read": 7 } }],
    ["object-add", { "qom-type": "throttle-group", id: "tg0", limits: { "bps-total": 1000, "bps-read": 7 } }],
    ["qom-get", { path: "/objects/tg0", property: "limits" }],
    ["blockdev-add", { driver: "throttle", "node-name": "t", "throttle-group": "tg0", file: "r1" }],
    ["x-debug-query-block-graph"],
    ["object-del", { id: "tg0" }],
    ["blockdev-del", { "node-name": "r1" }],
    ["blockdev-del", { "node-name": "t" }],
    ["blockdev-del", { "node-name": "f2" }],
    ["blockdev-del", { "node-name": "nosuch" }],
    ["blockdev-del", { "node-name": "r1" }],
    ["block_resize", { "node-name": "r2", size: 2 * MiB }],
    ["query-named-block-nodes"],
    ["blockdev-del", { "node-name": "r2" }],
    ["blockdev-del", { "node-name": "f2" }],
    ["query-named-block-nodes"],
    [
      "blockdev-add",
      {
        driver: "qcow2",
        "node-name": "q",
        "read-only": true,
        backing: null,
        file: { driver: "file", filename: `${dir}/c.qcow2` },
      },
    ],
    ["block-dirty-bitmap-add", { node: "q", name: "bm" }],
    ["query-named-block-nodes", { flat: true }],
    ["blockdev-del", { "node-name": "q" }],
    [
      "blockdev-add",
      {
        driver: "qcow2",
        "node-name": "top",
        "read-only": true,
        file: { driver: "file", filename: `${dir}/top.qcow2` },
      },
    ],
    ["query-named-block-nodes"],
    [
      "blockdev-add",
      {
        driver: "qcow2",
        "node-name": "top2",
        "read-only": true,
        backing: null,
        file: { driver: "file", filename: `${dir}/top.qcow2` },
      },
    ],
    ["blockdev-del", { "node-name": "top2" }],
    ["blockdev-del", { "node-name": "top" }],
    ["query-named-block-nodes"],
  ];
}

function mask(v: unknown, dir: string): unknown {
  if (typeof v === "string") return v.replaceAll(dir, "$DIR").replace(/^#block\d+$/, "#block");
  if (Array.isArray(v)) return v.map((e) => mask(e, dir));
  if (typeof v === "object" && v !== null) {
    const out: Record<string, unknown> = {};
    for (const [k, e] of Object.entries(v)) out[k] = k === "actual-size" ? "<size>" : mask(e, dir);
    return out;
  }
  return v;
}

interface Graph {
  nodes: { id: number; type: string; name: string }[];
  edges: { parent: number; child: number; name: string; perm: string[]; "shared-perm": string[] }[];
}

/** Ids are generated: compare the graph as sorted names and edges. */
function normalizeGraph(g: Graph): unknown {
  const name = (id: number): string => {
    const n = g.nodes.find((x) => x.id === id);
    return `${n?.type}:${(n?.name ?? "?").replace(/^#block\d+$/, "#block")}`;
  };
  return {
    nodes: g.nodes.map((n) => name(n.id)).sort(),
    edges: g.edges
      .map(
        (e) =>
          `${name(e.parent)} -${e.name}-> ${name(e.child)} [${[...e.perm].sort()}] [${[...e["shared-perm"]].sort()}]`,
      )
      .sort(),
  };
}

async function runScript(qmp: QmpClient, dir: string, steps: Step[] = script(dir)): Promise<unknown[]> {
  const out: unknown[] = [];
  for (const [cmd, args] of steps) {
    const mark = qmp.eventMark();
    try {
      let result = await qmp.execute(cmd, args);
      if (cmd === "x-debug-query-block-graph") result = normalizeGraph(result as Graph);
      if (cmd === "block-export-del" || cmd === "quit") {
        const ev = await qmp.waitEvent("BLOCK_EXPORT_DELETED", { since: mark, timeoutMs: 5000 });
        out.push({ cmd, event: ev.event, data: ev.data });
      }
      out.push({ cmd, return: mask(result, dir) });
    } catch (e) {
      if (!(e instanceof QmpError)) throw e;
      out.push({ cmd, error: { class: e.errorClass, desc: mask(e.desc, dir) } });
    }
  }
  return out;
}

function prepare(dir: TempDir): string[] {
  writeFileSync(dir.join("a.img"), Buffer.alloc(MiB));
  writeFileSync(dir.join("b.img"), Buffer.alloc(MiB));
  execFileSync("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "cluster_size=4096",
    dir.join("c.qcow2"),
    "16M",
  ]);
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", dir.join("base.qcow2"), "16M"]);
  execFileSync("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-b",
    "base.qcow2",
    "-F",
    "qcow2",
    dir.join("top.qcow2"),
  ]);
  return [
    `driver=file,node-name=f2,filename=${dir.join("b.img")}`,
    '{"driver": "raw", "node-name": "r2", "file": "f2"}',
  ];
}

async function startQsd(
  dir: TempDir,
  options: (readonly [string, string])[],
): Promise<{ qmp: QmpClient; stop(): Promise<void> }> {
  const sock = dir.join("qsd.sock");
  const args = ["--chardev", `socket,id=m,path=${sock},server=on,wait=off`, "--monitor", "m"];
  for (const [name, arg] of options) args.push(`--${name}`, arg);
  // qemu-storage-daemon 7.2 rarely hangs at start-up: time out and retry.
  for (let attempt = 1; ; attempt++) {
    const peer = await spawnPeer("qemu-storage-daemon", args, { timeoutMs: 60_000 });
    try {
      await waitForPath(sock, 5000);
      // the socket file appears at bind(), before listen(): retry refused connections for a while
      let qmp: QmpClient | undefined;
      for (let i = 0; qmp === undefined; i++) {
        try {
          qmp = await QmpClient.connect({ path: sock }, { timeoutMs: 5000 });
        } catch (e) {
          if (i >= 50) throw e;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      return {
        qmp,
        stop: async () => {
          await qmp.close();
          await peer.stop();
        },
      };
    } catch (e) {
      await peer.stop(0);
      if (attempt >= 3) throw new Error(`qemu-storage-daemon did not start: ${peer.output()}`, { cause: e });
    }
  }
}

describe.skipIf(missing.length > 0)("blkd and qemu-storage-daemon side by side", { tags: ["qemu"] }, () => {
  it("gives the same results for the same scenario", { timeout: 60_000 }, async () => {
    await using qsdDir = makeTempDir("qsd");
    await using blkDir = makeTempDir("blkd");
    const qsd = await startQsd(
      qsdDir,
      prepare(qsdDir).map((b) => ["blockdev", b] as const),
    );
    let expected: unknown[];
    try {
      expected = await runScript(qsd.qmp, qsdDir.path);
    } finally {
      await qsd.stop();
    }
    await using daemon = await createDaemon({
      options: prepare(blkDir).map((b) => ["blockdev", b] as const),
    });
    const sock = blkDir.join("blkd.sock");
    await daemon.qmp.listen({ path: sock });
    await using qmp = await QmpClient.connect({ path: sock });
    const actual = await runScript(qmp, blkDir.path);
    expect(expected.filter((r) => "return" in (r as object)).length).toBeGreaterThan(25);
    expect(actual).toHaveLength(expected.length);
    for (let i = 0; i < expected.length; i++) expect.soft(actual[i], `step ${i}`).toEqual(expected[i]);
  });

  it("configured from the command line (transcripts §4): exports, throttle, graph", {
    timeout: 60_000,
  }, async () => {
    const options = (dir: TempDir): (readonly [string, string])[] => {
      writeFileSync(dir.join("disk.img"), Buffer.alloc(4 * MiB));
      return [
        ["blockdev", `driver=file,node-name=disk-file,filename=${dir.join("disk.img")}`],
        ["blockdev", "driver=raw,node-name=disk,file=disk-file"],
        ["object", "throttle-group,id=tg0,x-bps-total=10485760,x-iops-total=1000"],
        ["blockdev", "driver=throttle,node-name=disk-thr,throttle-group=tg0,file=disk"],
        ["nbd-server", `addr.type=unix,addr.path=${dir.join("nbd.sock")},max-connections=4`],
        ["export", "type=nbd,id=exp0,node-name=disk-thr,name=disk,writable=on"],
        ["object", '{"qom-type": "throttle-group", "id": "tg1", "limits": {"iops-total": 500}}'],
      ];
    };
    const steps: Step[] = [
      ["query-block-exports"],
      ["qom-get", { path: "/objects/tg0", property: "limits" }],
      ["qom-get", { path: "/objects/tg1", property: "limits" }],
      ["query-named-block-nodes", { flat: true }],
      ["x-debug-query-block-graph"],
      ["blockdev-del", { "node-name": "disk-thr" }],
      ["blockdev-del", { "node-name": "disk" }],
      ["block-export-add", { type: "nbd", id: "exp0", "node-name": "disk" }],
      ["block-export-add", { type: "nbd", id: "exp1", "node-name": "disk", name: "disk" }],
      ["block-export-add", { type: "nbd", id: "exp1", "node-name": "disk", bitmaps: ["nob"] }],
      ["block-export-add", { type: "nbd", id: "exp2", "node-name": "disk", name: "d2" }],
      ["query-block-exports"],
      ["blockdev-add", { driver: "null-co", "node-name": "ro0", "read-only": true }],
      // A writable export of a read-only node is refused before the name and description checks.
      ["block-export-add", { type: "nbd", id: "exp3", "node-name": "ro0", name: "d2", writable: true }],
      [
        "block-export-add",
        { type: "nbd", id: "exp3", "node-name": "ro0", writable: true, description: "x".repeat(5000) },
      ],
      ["block-export-del", { id: "exp0" }],
      ["query-block-exports"],
      ["nbd-server-stop"],
      ["nbd-server-stop"],
      ["block-export-add", { type: "nbd", id: "exp1", "node-name": "disk" }],
      ["block-export-add", { type: "nbd", id: "exp4", "node-name": "ro0", writable: true }],
      ["blockdev-del", { "node-name": "disk-thr" }],
      ["object-del", { id: "tg0" }],
    ];
    await using qsdDir = makeTempDir("qsd");
    await using blkDir = makeTempDir("blkd");
    const qsd = await startQsd(qsdDir, options(qsdDir));
    let expected: unknown[];
    try {
      expected = await runScript(qsd.qmp, qsdDir.path, steps);
    } finally {
      await qsd.stop();
    }
    await using daemon = await createDaemon({ options: options(blkDir) as [never, string][] });
    const sock = blkDir.join("blkd.sock");
    await daemon.qmp.listen({ path: sock });
    await using qmp = await QmpClient.connect({ path: sock });
    const actual = await runScript(qmp, blkDir.path, steps);
    expect(actual).toHaveLength(expected.length);
    for (let i = 0; i < expected.length; i++) expect.soft(actual[i], `step ${i}`).toEqual(expected[i]);
  });
});
