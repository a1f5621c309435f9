/**
 * Side by side with qemu-storage-daemon 7.2 (see jobs-harness.ts for what is compared): blockdev-create
 * jobs and the images they leave, external snapshots (blockdev-snapshot-sync, blockdev-snapshot) with
 * their chains, an export written by qemu-io and read by nbdinfo, and throttle-group limits seen through
 * an export (a lower bound on the time the same I/O takes, and qom-get/qom-set of the limits).
 */
import { readFileSync, writeFileSync } from "node:fs";
import { missingPeers, run, type TempDir } from "@blk/testkit";
import { describe, expect, it } from "vitest";
import {
  type Ctx,
  expectSame,
  expectSameImage,
  MiB,
  nbdWrite,
  qemuImg,
  qemuIo,
  sideBySide,
} from "./jobs-harness.ts";

const missing = missingPeers(["qemu-storage-daemon", "qemu-img", "qemu-io", "nbdinfo"]);
if (missing.length > 0) console.log(`side-by-side-images.qemu.test: skipped, missing ${missing.join(", ")}`);

const file = (ctx: Ctx, name: string) => ({ driver: "file", filename: `${ctx.dir}/${name}` });

async function exportNode(ctx: Ctx, node: string, extra: Record<string, unknown> = {}): Promise<string> {
  const sock = `${ctx.dir}/nbd.sock`;
  await ctx.must("nbd-server-start", { addr: { type: "unix", data: { path: sock } } });
  await ctx.must("block-export-add", { type: "nbd", id: "e0", "node-name": node, name: "disk", ...extra });
  return sock;
}

async function unexport(ctx: Ctx): Promise<void> {
  await ctx.must("block-export-del", { id: "e0" });
  await ctx.waitEvent("BLOCK_EXPORT_DELETED");
  await ctx.must("nbd-server-stop");
}

/** nbdinfo's output for the export, the socket path masked. */
async function nbdinfo(sock: string, ...args: string[]): Promise<string> {
  const r = await run("nbdinfo", [...args, `nbd+unix:///disk?socket=${sock}`], { timeoutMs: 30_000 });
  if (r.code !== 0) throw new Error(`nbdinfo ${args.join(" ")}: ${r.stderr}`);
  return r.stdout.replaceAll(sock, "$SOCK");
}

interface Graph {
  nodes: { id: number; type: string; name: string }[];
  edges: { parent: number; child: number; name: string; perm: string[]; "shared-perm": string[] }[];
}

/** Graph ids are generated: the graph as sorted names and edges. */
function normalizeGraph(v: unknown): unknown {
  const g = v as Graph;
  const name = (id: number): string => {
    const n = g.nodes.find((x) => x.id === id);
    return `${n?.type}:${(n?.name ?? "?").replace(/^#block\d+$/, "#block")}`;
  };
  const perms = (p: string[]): string => [...p].sort().join(",");
  return {
    nodes: g.nodes.map((n) => name(n.id)).sort(),
    edges: g.edges
      .map(
        (e) =>
          `${name(e.parent)} -${e.name}-> ${name(e.child)} [${perms(e.perm)}] [${perms(e["shared-perm"])}]`,
      )
      .sort(),
  };
}

describe.skipIf(missing.length > 0)(
  "blkd and qemu-storage-daemon side by side: images",
  { tags: ["qemu"] },
  () => {
    it("blockdev-create: file and qcow2 jobs, failed jobs, and the images they leave", {
      timeout: 60_000,
    }, async () => {
      await using r = await sideBySide({
        setup: async () => {},
        scenario: async (ctx) => {
          /** A create job run to its end and dismissed; nothing to wait for when the command failed. */
          const create = async (id: string, options: Record<string, unknown>): Promise<void> => {
            if ((await ctx.exec("blockdev-create", { "job-id": id, options })) === undefined) return;
            await ctx.waitStatus(id, "concluded");
            await ctx.exec("query-jobs");
            await ctx.must("job-dismiss", { id });
            await ctx.waitStatus(id, "null");
          };
          await create("c0", { ...file(ctx, "new.qcow2"), size: 0 });
          await ctx.must("blockdev-add", { ...file(ctx, "new.qcow2"), "node-name": "f" });
          await create("c1", { driver: "qcow2", file: "f", size: 64 * MiB, "cluster-size": 65536 });
          await create("c2", { ...file(ctx, "lazy.qcow2"), size: 0 });
          await ctx.must("blockdev-add", { ...file(ctx, "lazy.qcow2"), "node-name": "g" });
          await create("c3", {
            driver: "qcow2",
            file: "g",
            size: 3 * MiB + 512,
            "cluster-size": 4096,
            "lazy-refcounts": true,
            "refcount-bits": 64,
          });
          // Errors: a job id in use, a missing node and an invalid cluster size (the jobs fail), bad arguments.
          await ctx.exec("blockdev-create", { "job-id": "c4", options: { ...file(ctx, "x.img"), size: 0 } });
          const c4 = ctx.lastMark;
          await ctx.exec("blockdev-create", { "job-id": "c4", options: { ...file(ctx, "y.img"), size: 0 } });
          await ctx.waitStatus("c4", "concluded", c4);
          await ctx.must("job-dismiss", { id: "c4" });
          await create("c5", { driver: "qcow2", file: "nosuch", size: MiB });
          await create("c6", { driver: "qcow2", file: "g", size: MiB, "cluster-size": 1000 });
          await ctx.exec("blockdev-create", { "job-id": "c7", options: { driver: "qcow2", file: "g" } });
          await ctx.exec("blockdev-create", {
            "job-id": "c7",
            options: { driver: "file", filename: 7, size: 0 },
          });
          await ctx.exec("blockdev-create", { options: { driver: "file", filename: "z", size: 0 } });
          await ctx.exec("blockdev-create", { "job-id": "c7", options: { driver: "bogus", size: 0 } });
          await ctx.must("blockdev-del", { "node-name": "f" });
          await ctx.must("blockdev-del", { "node-name": "g" });
        },
      });
      expectSame(r);
      await expectSameImage(r, "new.qcow2");
      await expectSameImage(r, "lazy.qcow2");
      for (const f of ["new.qcow2", "lazy.qcow2", "x.img"]) {
        const ours = readFileSync(`${r.blkd.dir.path}/${f}`);
        const theirs = readFileSync(`${r.qsd.dir.path}/${f}`);
        expect.soft(Buffer.compare(ours, theirs), `${f}: byte for byte`).toBe(0);
      }
    });

    it("external snapshots: blockdev-snapshot-sync and blockdev-snapshot under a writer, errors, chains", {
      timeout: 60_000,
    }, async () => {
      await using r = await sideBySide({
        setup: async (dir: TempDir) => {
          await qemuImg("create", "-q", "-f", "qcow2", dir.join("disk.qcow2"), "8M");
          await qemuIo("-c", "write -P 0x11 0 1M", dir.join("disk.qcow2"));
          // Overlays made ahead, naming the images they will sit on (as blockdev-snapshot wants them).
          const overlay = (name: string, backing: string) =>
            qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", dir.join(name), "8M");
          await overlay("ov2.qcow2", dir.join("ov1.qcow2"));
          await overlay("ov3.qcow2", dir.join("ov2.qcow2"));
        },
        scenario: async (ctx) => {
          await ctx.must("blockdev-add", {
            driver: "qcow2",
            "node-name": "disk",
            file: file(ctx, "disk.qcow2"),
          });
          const sock = await exportNode(ctx, "disk", { writable: true });
          await nbdWrite(sock, "disk", "write -P 0x22 1M 1M");
          await ctx.exec("blockdev-snapshot-sync", {
            "node-name": "disk",
            "snapshot-file": `${ctx.dir}/ov1.qcow2`,
            "snapshot-node-name": "ov1",
            format: "qcow2",
          });
          await nbdWrite(sock, "disk", "write -P 0x33 2M 1M");
          await ctx.exec("blockdev-add", {
            driver: "qcow2",
            "node-name": "ov2",
            backing: null,
            file: file(ctx, "ov2.qcow2"),
          });
          await ctx.exec("blockdev-snapshot", { node: "ov1", overlay: "ov2" });
          await nbdWrite(sock, "disk", "write -P 0x44 3M 1M");
          // Errors: the overlay now has a backing node; missing nodes; a node that is not a root; an existing
          // image with mode=existing of another size is opened as it is.
          await ctx.exec("blockdev-snapshot", { node: "ov1", overlay: "ov2" });
          await ctx.exec("blockdev-snapshot", { node: "nosuch", overlay: "ov2" });
          await ctx.exec("blockdev-snapshot-sync", {
            "node-name": "nosuch",
            "snapshot-file": `${ctx.dir}/n.qcow2`,
          });
          await ctx.exec("blockdev-snapshot-sync", {
            "node-name": "ov2",
            "snapshot-file": `${ctx.dir}/ov2.qcow2`,
          });
          await ctx.exec("blockdev-snapshot-sync", {
            "node-name": "ov2",
            "snapshot-file": `${ctx.dir}/ov3.qcow2`,
            "snapshot-node-name": "ov3",
            mode: "existing",
          });
          await ctx.exec("query-named-block-nodes", { flat: true });
          await ctx.exec("x-debug-query-block-graph", undefined, normalizeGraph);
          ctx.note("nbdinfo --map", await nbdinfo(sock, "--map"));
          await unexport(ctx);
        },
      });
      expectSame(r);
      for (const f of ["disk.qcow2", "ov1.qcow2", "ov2.qcow2"]) await expectSameImage(r, f);
      /** `qemu-img info --backing-chain`, the dir masked and sizes on disk dropped. */
      const chain = async (dir: string, f: string): Promise<unknown> =>
        (
          JSON.parse(
            (await qemuImg("info", "--output=json", "-U", "--backing-chain", `${dir}/${f}`)).replaceAll(
              dir,
              "$DIR",
            ),
          ) as Record<string, unknown>[]
        ).map(({ "actual-size": _a, "dirty-flag": _d, ...rest }) => rest);
      for (const f of ["ov1.qcow2", "ov2.qcow2", "ov3.qcow2"])
        expect.soft(await chain(r.blkd.dir.path, f), f).toEqual(await chain(r.qsd.dir.path, f));
    });

    it("an export written by qemu-io and read by nbdinfo (sizes, flags, allocation, dirty bitmap)", {
      timeout: 60_000,
    }, async () => {
      await using r = await sideBySide({
        setup: async (dir: TempDir) => {
          writeFileSync(dir.join("disk.img"), "");
          await run("truncate", ["-s", "16M", dir.join("disk.img")]);
        },
        scenario: async (ctx) => {
          await ctx.must("blockdev-add", { driver: "raw", "node-name": "disk", file: file(ctx, "disk.img") });
          await ctx.must("block-dirty-bitmap-add", { node: "disk", name: "b0", granularity: 65536 });
          const sock = await exportNode(ctx, "disk", { writable: true, bitmaps: ["b0"], description: "d" });
          await ctx.exec("query-block-exports");
          await nbdWrite(sock, "disk", "write -P 0x55 0 64k", "write -P 0x66 5M 100k", "write -z 8M 1M");
          await qemuIo(
            "-f",
            "raw",
            "-c",
            "read -P 0x55 0 64k",
            "-c",
            "read -P 0x66 5M 100k",
            `nbd+unix:///disk?socket=${sock}`,
          );
          ctx.note("size", await nbdinfo(sock, "--size"));
          ctx.note("can", [
            await nbdinfo(sock, "--can", "write").then(
              () => "write",
              () => "no write",
            ),
          ]);
          ctx.note("dirty map", await nbdinfo(sock, "--map=qemu:dirty-bitmap:b0"));
          const json = JSON.parse(
            await nbdinfo(sock, "--json").catch((e: Error) => {
              throw new Error(`${ctx.side}: ${e.message}`);
            }),
          ) as { exports: Record<string, unknown>[] };
          const exp = json.exports[0] ?? {};
          ctx.note(
            "export",
            Object.fromEntries(
              [
                "export-name",
                "description",
                "export-size",
                "is_read_only",
                "can_flush",
                "can_fua",
                "can_trim",
                "can_zero",
                "can_df",
                "can_multi_conn",
                "can_cache",
                "contexts",
              ].map((k) => [k, exp[k]]),
            ),
          );
          await ctx.exec("query-named-block-nodes", { flat: true });
          await unexport(ctx);
        },
      });
      expectSame(r);
      await expectSameImage(r, "disk.img", { format: "raw" });
    });

    it("throttle-group limits seen through an export: qom-get/qom-set, and the I/O takes at least as long", {
      timeout: 60_000,
    }, async () => {
      const elapsed: Record<string, number> = {};
      const OPS = 24;
      const IOPS = 20;
      await using r = await sideBySide({
        setup: async (dir: TempDir) => {
          writeFileSync(dir.join("disk.img"), Buffer.alloc(4 * MiB));
        },
        scenario: async (ctx) => {
          await ctx.must("object-add", {
            "qom-type": "throttle-group",
            id: "tg0",
            limits: { "iops-total": 1000 },
          });
          await ctx.must("blockdev-add", { driver: "raw", "node-name": "disk", file: file(ctx, "disk.img") });
          await ctx.must("blockdev-add", {
            driver: "throttle",
            "node-name": "thr",
            "throttle-group": "tg0",
            file: "disk",
          });
          const sock = await exportNode(ctx, "thr", { writable: true });
          // Refused values first (an accepted one would slow the writes below).
          await ctx.exec("qom-set", { path: "tg0", property: "limits", value: { "iops-total": -1 } });
          await ctx.exec("qom-set", {
            path: "tg0",
            property: "limits",
            value: { "iops-total": 1, "iops-total-max": 0.5 },
          });
          await ctx.exec("qom-set", { path: "tg0", property: "limits", value: { "iops-total": IOPS } });
          await ctx.exec("qom-get", { path: "tg0", property: "limits" });
          await ctx.exec("qom-get", { path: "/objects/tg0", property: "x-iops-total" });
          await ctx.exec("qom-list", { path: "objects/tg0" });
          await ctx.exec("qom-list", { path: "/objects" });
          const writes = Array.from({ length: OPS }, (_, i) => `write -P ${i + 1} ${i * 4096} 4k`);
          const t0 = performance.now();
          await nbdWrite(sock, "disk", ...writes);
          elapsed[ctx.side] = performance.now() - t0;
          await unexport(ctx);
          await ctx.must("blockdev-del", { "node-name": "thr" });
          await ctx.must("object-del", { id: "tg0" });
        },
      });
      expectSame(r);
      await expectSameImage(r, "disk.img", { format: "raw" });
      // A bucket holds a tenth of a second's worth when no burst is set: OPS requests at IOPS per second
      // cannot take much less than (OPS - IOPS / 10) / IOPS seconds; a slower machine only adds to that.
      // Unthrottled they take a few ms each.
      const floorMs = ((OPS - IOPS / 10 - 2) / IOPS) * 1000 * 0.8;
      expect(elapsed.qsd, "qemu-storage-daemon").toBeGreaterThan(floorMs);
      expect(elapsed.blkd, "blkd").toBeGreaterThan(floorMs);
    });

    it("BLOCK_IMAGE_CORRUPTED: metadata found corrupt through an export, fatal when writable", {
      timeout: 60_000,
    }, async () => {
      await using r = await sideBySide({
        setup: async (dir: TempDir) => {
          for (const f of ["rw.qcow2", "ro.qcow2"]) {
            await qemuImg("create", "-q", "-f", "qcow2", dir.join(f), "8M");
            await qemuIo("-c", "write -P 0x5a 0 64k", dir.join(f));
            // L1[0] moved off its cluster boundary: found when a request reaches it, not at open.
            const img = readFileSync(dir.join(f));
            const l1 = Number(img.readBigUInt64BE(40));
            img.writeBigUInt64BE(img.readBigUInt64BE(l1) + 0x200n, l1);
            writeFileSync(dir.join(f), img);
          }
        },
        scenario: async (ctx) => {
          const sock = `${ctx.dir}/nbd.sock`;
          await ctx.must("nbd-server-start", { addr: { type: "unix", data: { path: sock } } });
          for (const [name, readOnly] of [
            ["rw", false],
            ["ro", true],
          ] as const) {
            await ctx.must("blockdev-add", {
              driver: "qcow2",
              "node-name": name,
              "read-only": readOnly,
              file: { ...file(ctx, `${name}.qcow2`), "read-only": readOnly },
            });
            await ctx.must("block-export-add", { type: "nbd", id: name, "node-name": name, name });
            const read = await run("qemu-io", [
              "-r",
              "-f",
              "raw",
              "-c",
              "read 0 4k",
              `nbd+unix:///${name}?socket=${sock}`,
            ]);
            // (QEMU answers EIO; blkd's NBD server takes a failed block status for data, then the read finds
            // the node gone: EINVAL. Both fail the read.)
            ctx.note(`${name}: read failed`, /read failed/.test(read.stdout + read.stderr));
            ctx.note(`${name}: event`, (await ctx.waitEvent("BLOCK_IMAGE_CORRUPTED")).data);
            await ctx.must("block-export-del", { id: name });
            await ctx.waitEvent("BLOCK_EXPORT_DELETED");
            await ctx.must("blockdev-del", { "node-name": name });
          }
          await ctx.must("nbd-server-stop");
        },
      });
      expectSame(r);
      // The writable image is marked corrupt, as QEMU marks it.
      for (const side of [r.qsd, r.blkd]) {
        const info = await run("qemu-img", ["info", "--output=json", "-U", `${side.dir.path}/rw.qcow2`]);
        expect.soft(JSON.parse(info.stdout)["format-specific"].data.corrupt, side.side).toBe(true);
      }
    });
  },
);
