/**
 * `blk-img snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot |
 * -d snapshot] filename`: qemu-img 7.2's internal snapshot command (qemu-img.md §15). `-l` (the default)
 * lists with qemu-img's fixed-width table (nothing at all without snapshots); `-c` creates (duplicate
 * names allowed), `-a` reverts (ID or name), `-d` deletes (name only). Success prints nothing.
 */
import { BlkError, type BlockNode, strerror as codeText } from "@blk/core";
import type { Context } from "../context.ts";
import { CliError, messageOf, usage } from "../errors.ts";
import { getopt } from "../getopt.ts";
import { openImg } from "../image.ts";
import { humanSize } from "../size.ts";
import { commandHelp } from "../usage.ts";

/** What the command needs of a format driver's state (the qcow2 driver has it). */
interface SnapshotState {
  snapshotInfo(): Record<string, unknown>[];
  createSnapshot(name: string): Promise<unknown>;
  applySnapshot(idOrName: string): Promise<void>;
  deleteSnapshot(name: string): Promise<void>;
}

function snapshotState(node: BlockNode): SnapshotState | undefined {
  let s: unknown;
  try {
    s = node.state;
  } catch {
    return undefined;
  }
  const o = s as Partial<SnapshotState> | null;
  return o !== null &&
    typeof o.snapshotInfo === "function" &&
    typeof o.createSnapshot === "function" &&
    typeof o.applySnapshot === "function" &&
    typeof o.deleteSnapshot === "function"
    ? (o as SnapshotState)
    : undefined;
}

const strerror = (e: unknown): string => (e instanceof BlkError ? codeText(e.code) : messageOf(e));

const two = (n: number): string => String(n).padStart(2, "0");

/**
 * QEMU's `bdrv_snapshot_dump` table (used by `snapshot -l` and `info`) (`%-9s %-16s %8s%20s%13s%11s`): header lines, then one line per
 * snapshot with the date in local time and the VM clock as `HH:MM:SS.mmm`.
 */
export function snapshotTable(snaps: readonly unknown[]): string[] {
  const lines = [
    "Snapshot list:",
    `${"ID".padEnd(10)}${"TAG".padEnd(17)}${"VM SIZE".padStart(8)}${"DATE".padStart(20)}${"VM CLOCK".padStart(13)}${"ICOUNT".padStart(11)}`,
  ];
  for (const raw of snaps) {
    const s = raw as Record<string, unknown>;
    const d = new Date(Number(s["date-sec"] ?? 0) * 1000);
    const date = `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
    const secs = Number(s["vm-clock-sec"] ?? 0);
    const ms = Math.floor(Number(s["vm-clock-nsec"] ?? 0) / 1e6) % 1000;
    const clock = `${two(Math.floor(secs / 3600))}:${two(Math.floor(secs / 60) % 60)}:${two(secs % 60)}.${String(ms).padStart(3, "0")}`;
    const icount = s.icount === undefined ? "" : String(s.icount);
    lines.push(
      `${String(s.id ?? "").padEnd(9)} ${String(s.name ?? "").padEnd(16)} ${humanSize(Number(s["vm-state-size"] ?? 0)).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`,
    );
  }
  return lines;
}

const snapshotList = (snaps: readonly Record<string, unknown>[]): string =>
  `${snapshotTable(snaps).join("\n")}\n`;

type Action = { kind: "list" } | { kind: "apply" | "create" | "delete"; name: string };

/** Runs `snapshot`. */
export async function snapshot(args: readonly string[], ctx: Context): Promise<number> {
  const { options, operands } = getopt(args, "la:c:d:hqU", [
    { name: "help", hasArg: false, key: "h" },
    { name: "object", hasArg: true },
    { name: "image-opts", hasArg: false },
    { name: "force-share", hasArg: false, key: "U" },
  ]);
  let action: Action | undefined;
  let imageOpts = false;
  let forceShare = false;
  const set = (a: Action): void => {
    if (action !== undefined) throw usage("Cannot mix '-l', '-a', '-c', '-d'");
    action = a;
  };
  for (const o of options) {
    if (o.key === "h") {
      ctx.out(commandHelp("snapshot"));
      return 0;
    }
    if (o.key === "l") set({ kind: "list" });
    else if (o.key === "a") set({ kind: "apply", name: o.value });
    else if (o.key === "c") set({ kind: "create", name: o.value });
    else if (o.key === "d") set({ kind: "delete", name: o.value });
    else if (o.key === "image-opts") imageOpts = true;
    else if (o.key === "U") forceShare = true;
  }
  if (operands.length !== 1) throw usage("Expecting one image file name");
  const filename = operands[0] ?? "";
  const act: Action = action ?? { kind: "list" };
  // As qemu-img: only an explicit -l opens read-only (listing by default opens read-write).
  const readOnly = action?.kind === "list";
  if (forceShare && !readOnly) {
    throw new CliError(`Could not open '${filename}': force-share=on can only be used with read-only images`);
  }
  const img = await openImg({
    filename,
    imageOpts,
    readOnly,
    forceShare,
    readsData: false,
    onWarning: (m) => ctx.err(`${m}\n`),
  });
  try {
    const st = snapshotState(img.node);
    switch (act.kind) {
      case "list": {
        const snaps = st?.snapshotInfo() ?? [];
        if (snaps.length > 0) ctx.out(snapshotList(snaps));
        return 0;
      }
      case "create":
        try {
          if (st === undefined) throw new BlkError("ENOTSUP", "Operation not supported");
          await st.createSnapshot(act.name);
        } catch (e) {
          const errno = e instanceof BlkError ? e.errno : -5;
          throw new CliError(`Could not create snapshot '${act.name}': ${errno} (${strerror(e)})`);
        }
        return 0;
      case "apply":
        if (st === undefined) {
          throw new CliError(
            `Could not apply snapshot '${act.name}': Block driver does not support snapshots`,
          );
        }
        try {
          await st.applySnapshot(act.name);
        } catch (e) {
          throw new CliError(
            `Could not apply snapshot '${act.name}': Failed to load snapshot: ${strerror(e)}`,
          );
        }
        return 0;
      case "delete":
        try {
          if (st === undefined) throw new BlkError("ENOENT", "snapshot not found");
          await st.deleteSnapshot(act.name);
        } catch (e) {
          throw new CliError(`Could not delete snapshot '${act.name}': ${messageOf(e)}`);
        }
        return 0;
    }
  } finally {
    await img.close();
  }
}
