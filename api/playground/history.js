// The caller's jobs, newest first, a page at a time (the API's cursors), each openable.

import { json } from "./api.js";

export const PAGE_SIZE = 5;

export class History {
  constructor({ onOpen, onError }) {
    this.onOpen = onOpen;
    this.onError = onError;
    this.cursors = [null]; // the cursor of each page shown so far; the last is this page's
    document.getElementById("older").addEventListener("click", () => this.older());
    document.getElementById("newer").addEventListener("click", () => this.newer());
  }

  async reload() {
    this.cursors = [null];
    await this.show();
  }

  async older() {
    if (!this.next) return;
    this.cursors.push(this.next);
    await this.show();
  }

  async newer() {
    if (this.cursors.length < 2) return;
    this.cursors.pop();
    await this.show();
  }

  async show() {
    const cursor = this.cursors[this.cursors.length - 1];
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (cursor) query.set("cursor", cursor);
    let page;
    try {
      page = await json(`/v1/generations?${query}`);
    } catch (err) {
      this.onError(err);
      return;
    }
    this.next = page.next_cursor;
    document.getElementById("history-rows").replaceChildren(...page.items.map((j) => this.row(j)));
    document.getElementById("older").disabled = !page.next_cursor;
    document.getElementById("newer").disabled = this.cursors.length < 2;
  }

  row(job) {
    const tr = document.createElement("tr");
    tr.dataset.jobId = job.id;
    const created = new Date(job.created_at).toLocaleString();
    for (const text of [created, job.model_key, job.status, job.id.slice(0, 8)]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = "open";
    open.addEventListener("click", () => this.onOpen(job.id));
    const td = document.createElement("td");
    td.append(open);
    tr.append(td);
    return tr;
  }
}
