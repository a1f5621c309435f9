/**
 * `-p` progress: qemu-img's plain `    (P/100%)\r` updates when stdout is not a terminal, a drawn bar
 * when it is.
 */
import type { Context } from "./context.ts";

/**
 * A progress display; `update` takes a fraction in [0, 1]; `end` finishes the line; `interrupt` lets a
 * message be printed (on a terminal it ends the bar's line first; qemu-img's plain form prints messages
 * between updates).
 */
export interface Progress {
  update(fraction: number): void;
  end(): void;
  interrupt(): void;
}

const NONE: Progress = { update: () => {}, end: () => {}, interrupt: () => {} };

/**
 * A progress display on stdout, or one that prints nothing when `enabled` is false. Updates are printed
 * when the percentage moved by at least `minStep` points (and always at 0 and 100).
 */
export function makeProgress(ctx: Context, enabled: boolean, minStep = 1): Progress {
  if (!enabled) return NONE;
  const tty = ctx.io.isTTY ?? false;
  let last = -Infinity;
  let started = false;
  let ended = false;
  const t0 = performance.now();
  const draw = (pct: number): void => {
    if (!tty) {
      ctx.out(`    (${pct.toFixed(2)}/100%)\r`);
      return;
    }
    const width = Math.max(10, Math.min(50, (ctx.io.columns ?? 80) - 30));
    const fill = Math.round((pct / 100) * width);
    const secs = (performance.now() - t0) / 1000;
    ctx.out(
      `\r[${"#".repeat(fill)}${"-".repeat(width - fill)}] ${pct.toFixed(2).padStart(6)}%  ${secs.toFixed(1)}s `,
    );
  };
  return {
    update(fraction: number): void {
      if (ended) return;
      const pct = Math.max(0, Math.min(100, fraction * 100));
      if (!started || pct - last >= minStep || (pct === 100 && last !== 100)) {
        started = true;
        last = pct;
        draw(pct);
      }
    },
    end(): void {
      if (ended) return;
      ended = true;
      if (tty) draw(last);
      ctx.out("\n");
    },
    interrupt(): void {
      if (tty && started && !ended) {
        ended = true;
        ctx.out("\n");
      }
    },
  };
}
