/**
 * NBD export bitmaps looked up down the exported node's chain, side by side with qemu-storage-daemon 7.2
 * (see jobs-harness.ts): a bitmap of the backing node exported with an overlay (the fleecing layout),
 * through a filter, the exported node's own bitmap first, never a format's `file` child, `{node, name}`
 * on any node, a bitmap listed twice, and QEMU's refusals (missing, enabled on a writable node of a
 * read-only export, busy, inconsistent) in QEMU's order. Both daemons must answer the same, and
 * `nbdinfo --map=qemu:dirty-bitmap:NAME` must report the same extents.
 */
import type { TempDir } from "@blk/testkit";
import { missingPeers, run } from "@blk/testkit";
import { describe, it } from "vitest";
import { type Ctx, expectSame, nbdWrite, qemuImg, sideBySide } from "./jobs-harness.ts";

const missing = missingPeers(["qemu-storage-daemon", "qemu-img", "qemu-io", "nbdinfo"]);
if (missing.length > 0) console.log(`nbd-bitmap-chain: skipped, missing ${missing.join(", ")}`);

/**
 * base.qcow2 (4 MiB) under top.qcow2 (8 MiB); ro.qcow2 under rotop.qcow2; r.raw; incon.qcow2 (a persistent
 * bitmap `bad` left in use by a killed writer) under itop.qcow2.
 */
async function images(dir: TempDir): Promise<void> {
  const create = (file: string, size: string, backing?: string) =>
    qemuImg(
      "create",
      "-q",
      "-f",
      "qcow2",
      ...(backing === undefined ? [] : ["-b", dir.join(backing), "-F", "qcow2"]),
      dir.join(file),
      size,
    );
  await create("base.qcow2", "4M");
  await create("top.qcow2", "8M", "base.qcow2");
  await create("ro.qcow2", "4M");
  await create("rotop.qcow2", "4M", "ro.qcow2");
  await create("incon.qcow2", "4M");
  await create("itop.qcow2", "4M", "incon.qcow2");
  await qemuImg("create", "-q", "-f", "raw", dir.join("r.raw"), "4M");
  await qemuImg("bitmap", "--add", dir.join("incon.qcow2"), "bad");
  // Opened read-write, the bitmap is marked in use; the killed writer never clears the flag.
  const killed = await run("qemu-io", ["-c", "sigraise 9", dir.join("incon.qcow2")], { timeoutMs: 30_000 });
  if (killed.code === 0) throw new Error("qemu-io sigraise 9 did not kill qemu-io");
}

const qcow2 = (ctx: Ctx, name: string, file: string, extra: Record<string, unknown> = {}) =>
  ctx.must("blockdev-add", {
    driver: "qcow2",
    "node-name": name,
    file: { driver: "file", filename: `${ctx.dir}/${file}`, "node-name": `${name}-file` },
    ...extra,
  });

/** `query-named-block-nodes` reduced to each node's bitmaps (busy kept: the harness masks `busy`). */
const bitmapsByNode = (v: unknown): unknown =>
  Object.fromEntries(
    (v as { "node-name": string; "dirty-bitmaps"?: Record<string, unknown>[] }[])
      .filter((n) => n["dirty-bitmaps"] !== undefined && n["dirty-bitmaps"].length > 0)
      .map((n) => [
        n["node-name"],
        (n["dirty-bitmaps"] ?? []).map(
          (b) => `${String(b.name)} g=${String(b.granularity)} in-use=${String(b.busy)}`,
        ),
      ])
      .sort(([a], [b]) => String(a).localeCompare(String(b))),
  );

describe.skipIf(missing.length > 0)(
  "NBD export bitmaps through the chain, side by side",
  { tags: ["qemu"] },
  () => {
    it("finds bitmaps down filters and backing, with QEMU's checks, messages and extents", {
      timeout: 90_000,
    }, async () => {
      await using r = await sideBySide({
        setup: images,
        scenario: async (ctx) => {
          const sock = `${ctx.dir}/nbd.sock`;
          const uri = (name: string) => `nbd+unix:///${name}?socket=${sock}`;
          const exportAdd = (id: string, node: string, extra: Record<string, unknown>) =>
            ctx.exec("block-export-add", { type: "nbd", id, "node-name": node, name: id, ...extra });
          const del = async (id: string) => {
            await ctx.must("block-export-del", { id });
            await ctx.waitEvent("BLOCK_EXPORT_DELETED", (d) => d.id === id);
          };
          const map = async (exp: string, bitmap: string) => {
            const m = await run("nbdinfo", [`--map=qemu:dirty-bitmap:${bitmap}`, uri(exp)], {
              timeoutMs: 30_000,
            });
            ctx.note(`${exp} map ${bitmap}`, `${m.code} ${m.stdout}${m.stderr}`);
          };
          const contexts = async (exp: string) => {
            const m = await run("nbdinfo", ["--json", uri(exp)], { timeoutMs: 30_000 });
            const e = (JSON.parse(m.stdout) as { exports: { contexts?: string[] }[] }).exports[0];
            ctx.note(`${exp} contexts`, e?.contexts);
          };

          await qcow2(ctx, "base", "base.qcow2", { backing: null });
          await qcow2(ctx, "top", "top.qcow2", { backing: "base" });
          await ctx.must("blockdev-add", { driver: "blkdebug", "node-name": "flt", image: "top" });
          await qcow2(ctx, "ro", "ro.qcow2", { backing: null, "read-only": true });
          await qcow2(ctx, "rotop", "rotop.qcow2", { backing: "ro" });
          await qcow2(ctx, "incon", "incon.qcow2", { backing: null });
          await qcow2(ctx, "itop", "itop.qcow2", { backing: "incon" });
          await ctx.must("blockdev-add", {
            driver: "raw",
            "node-name": "raw",
            file: { driver: "file", filename: `${ctx.dir}/r.raw`, "node-name": "raw-file" },
          });
          await ctx.must("nbd-server-start", { addr: { type: "unix", data: { path: sock } } });

          // The source's bitmap records what a guest writes through its export.
          await ctx.must("block-dirty-bitmap-add", { node: "base", name: "b", granularity: 131072 });
          await exportAdd("guest", "base", { writable: true });
          await nbdWrite(
            sock,
            "guest",
            "write -P 0x11 0 1k",
            "write -P 0x12 1M 300k",
            "write -P 0x13 4000k 96k",
          );
          await del("guest");

          // Enabled, on a writable node, for a read-only export of the overlay: refused until disabled.
          await exportAdd("pull", "top", { bitmaps: ["b"] });
          await ctx.must("block-dirty-bitmap-disable", { node: "base", name: "b" });
          // The overlay's own bitmap comes first; a bitmap may be listed twice.
          await ctx.must("block-dirty-bitmap-add", { node: "top", name: "t", disabled: true });
          await ctx.must("block-dirty-bitmap-add", {
            node: "base",
            name: "t",
            disabled: true,
            granularity: 1048576,
          });
          await exportAdd("pull", "top", { bitmaps: ["b", "t", "b"] });
          await contexts("pull");
          await map("pull", "b");
          await map("pull", "t");
          await ctx.exec("query-named-block-nodes", {}, bitmapsByNode);

          // Busy (the enabled check comes first: `en` is enabled and busy).
          await ctx.must("block-dirty-bitmap-add", { node: "base", name: "en" });
          await exportAdd("rw", "top", { writable: true, bitmaps: ["en"] });
          await exportAdd("busy", "top", { bitmaps: ["b"] });
          await exportAdd("busy", "top", { bitmaps: ["en"] });
          await exportAdd("busy", "top", { bitmaps: [{ node: "base", name: "en" }] });
          await del("rw");
          // `{node, name}`: any node, no enabled check; QEMU's lookup messages.
          await exportAdd("ext", "top", { bitmaps: [{ node: "base", name: "en" }] });
          await exportAdd("bad", "top", { bitmaps: [{ node: "zz", name: "en" }] });
          await exportAdd("bad", "top", { bitmaps: [{ node: "top", name: "en" }] });
          await del("ext");

          // Through a filter.
          await ctx.must("block-dirty-bitmap-add", { node: "base", name: "d", disabled: true });
          await exportAdd("flt", "flt", { bitmaps: ["d"] });
          await contexts("flt");
          await del("flt");
          // Not down a format's file child, raw's included; missing names.
          await ctx.must("block-dirty-bitmap-add", { node: "top-file", name: "f", disabled: true });
          await ctx.must("block-dirty-bitmap-add", { node: "raw-file", name: "rf", disabled: true });
          await exportAdd("bad", "top", { bitmaps: ["f"] });
          await exportAdd("bad", "raw", { bitmaps: ["rf"] });
          await exportAdd("bad", "top", { bitmaps: ["zz", "d"] });
          await exportAdd("bad", "top", { bitmaps: ["d", "zz"] });
          // Inconsistent, in the backing node.
          await exportAdd("bad", "itop", { bitmaps: ["bad"] });
          // Enabled on a read-only backing node: the node it was found on decides.
          await ctx.must("block-dirty-bitmap-add", { node: "ro", name: "ren" });
          await exportAdd("ro", "rotop", { bitmaps: ["ren"] });
          await map("ro", "ren");
          // A writable export of a read-only node is refused before its bitmaps are looked at.
          await exportAdd("bad", "ro", { writable: true, bitmaps: ["zz"] });

          // (sorted: qsd lists the newest export first, blkd the oldest)
          await ctx.exec("query-block-exports", {}, (v) =>
            (v as Record<string, unknown>[])
              .map(
                (e) =>
                  `${String(e.id)} ${String(e["node-name"])} ${String(e.type)} ${String(e["shutting-down"])}`,
              )
              .sort(),
          );
          await ctx.exec("query-named-block-nodes", {}, bitmapsByNode);
          for (const id of ["pull", "ro"]) await del(id);
          await ctx.exec("query-named-block-nodes", {}, bitmapsByNode);
          await ctx.must("nbd-server-stop");
          for (const n of ["flt", "top", "base", "rotop", "ro", "itop", "incon", "raw"])
            await ctx.exec("blockdev-del", { "node-name": n });
        },
      });
      expectSame(r);
    });
  },
);
