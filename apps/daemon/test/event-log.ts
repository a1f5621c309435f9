/** Test helper: records the events a QMP client receives, in order, with markers (command returns) in between. */
import type { QmpClient, QmpEvent } from "@blk/qmp";

export interface EventLog {
  /** `STATUS:id` for JOB_STATUS_CHANGE, `EVENT:device-or-id` otherwise, and the markers, in arrival order. */
  readonly entries: string[];
  /** The events so far. */
  readonly events: QmpEvent[];
  /** Adds a marker after every event received so far (call it right after a command returned). */
  mark(text: string): void;
  /** The entries once every event received so far has been recorded. */
  settled(): Promise<string[]>;
  /** Forgets everything recorded so far. */
  reset(): void;
  /** Stops recording. */
  stop(): void;
}

const label = (e: QmpEvent): string => {
  const d = e.data as { id?: string; status?: string; device?: string } | undefined;
  return e.event === "JOB_STATUS_CHANGE"
    ? `${String(d?.status)}:${String(d?.id)}`
    : `${e.event}:${String(d?.device ?? d?.id ?? "")}`;
};

/** Starts recording. Markers are placed by event sequence number, so they sit where the return arrived. */
export function recordEvents(qmp: QmpClient): EventLog {
  let start = qmp.eventMark();
  const events: QmpEvent[] = [];
  let marks: { seq: number; text: string }[] = [];
  const it = qmp.events({ since: start });
  void (async () => {
    for await (const e of it) events.push(e);
  })().catch(() => {});
  return {
    get entries() {
      const list = [
        ...events.filter((e) => e.seq > start).map((e) => ({ seq: e.seq, text: label(e) })),
        ...marks,
      ];
      return list.sort((a, b) => a.seq - b.seq).map((x) => x.text);
    },
    get events() {
      return events.filter((e) => e.seq > start);
    },
    async settled() {
      const want = qmp.eventMark();
      await until(() => (events.at(-1)?.seq ?? start) >= want);
      return this.entries;
    },
    mark: (text) => {
      marks.push({ seq: qmp.eventMark() + 0.5, text });
    },
    reset: () => {
      start = qmp.eventMark();
      marks = [];
    },
    stop: () => {
      // A pending next() keeps return() waiting until the client closes: do not wait for it.
      void it.return?.().catch(() => {});
    },
  };
}

/** Resolves once `pred` holds (polling every 10 ms), or rejects after `ms`. */
export async function until(pred: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 10));
  }
}
