// One job on the page: its status, queue position, ETA, progress and previews while it runs,
// then its images beside the pose it was made with. Followed by polling GET
// /v1/generations/{id}.

import { ApiError, imageUrl, json } from "./api.js";
import { skeletonCanvas } from "./skeleton.js";

const TERMINAL = new Set(["completed", "failed", "canceled"]);
const POLL_MS = 400;

export class JobView {
  constructor({ templates, onFinished, onError }) {
    this.el = (id) => document.getElementById(id);
    this.templates = templates;
    this.onFinished = onFinished;
    this.onError = onError;
    this.following = null;
    this.el("cancel").addEventListener("click", () => this.cancel());
  }

  async open(jobId) {
    const token = {};
    this.following = token;
    this.shownPreview = null;
    this.el("job-outputs").replaceChildren();
    this.el("job-pose").replaceChildren();
    this.el("job-pose-box").hidden = true;
    this.el("job-preview-box").hidden = true;
    this.el("job").hidden = false;
    let job = await json(`/v1/generations/${jobId}`);
    while (this.following === token) {
      this.render(job);
      if (TERMINAL.has(job.status)) {
        await this.finish(job);
        return job;
      }
      await this.preview(job);
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      if (this.following !== token) return job;
      try {
        job = await json(`/v1/generations/${jobId}`);
      } catch (err) {
        this.onError(err);
        return job;
      }
    }
    return job;
  }

  render(job) {
    this.job = job;
    this.el("job-id").textContent = job.id;
    const status = this.el("job-status");
    status.textContent = job.status;
    status.dataset.status = job.status;
    const queued = job.status === "queued" && job.queue_position !== null;
    this.el("job-queue").textContent = queued ? `${job.queue_position} ahead in the queue` : "";
    const eta = job.eta_seconds;
    this.el("job-eta").textContent =
      !TERMINAL.has(job.status) && eta !== null && eta !== undefined ? `about ${Math.ceil(eta)} s` : "";
    const progress = this.el("job-progress");
    progress.max = job.progress.total || 1;
    progress.value = job.status === "completed" ? progress.max : job.progress.step;
    const error = this.el("job-error");
    error.hidden = !job.error;
    error.textContent = job.error ? `${job.error.message} (${job.error.code})` : "";
    this.el("cancel").hidden = TERMINAL.has(job.status);
  }

  async preview(job) {
    const url = job.progress.preview_url;
    if (!url || job.progress.step === this.shownPreview) return;
    this.shownPreview = job.progress.step;
    try {
      this.el("job-preview").src = await imageUrl(`${url}?step=${job.progress.step}`);
      this.el("job-preview-box").hidden = false;
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 404)) this.onError(err);
    }
  }

  async finish(job) {
    this.el("job-preview-box").hidden = true;
    await this.showPose(job);
    const outputs = this.el("job-outputs");
    for (const output of job.outputs) {
      const url = await imageUrl(output.url);
      const figure = document.createElement("figure");
      figure.className = "output";
      const img = document.createElement("img");
      img.src = url;
      img.alt = `Output ${output.index}`;
      const link = document.createElement("a");
      link.href = url;
      link.download = `${job.id}-${output.index}.${extension(output)}`;
      link.textContent = `download ${output.width}×${output.height}`;
      const caption = document.createElement("figcaption");
      caption.append(link);
      figure.append(img, caption);
      outputs.append(figure);
    }
    this.onFinished(job);
  }

  // The skeleton the job was conditioned on (`/pose`), or the template drawn here where the
  // API does not serve it.
  async showPose(job) {
    const box = this.el("job-pose");
    try {
      const img = document.createElement("img");
      img.src = await imageUrl(`/v1/generations/${job.id}/pose`);
      img.alt = "The pose used";
      box.replaceChildren(img);
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 404)) throw err;
      const template = this.templates().find((t) => t.id === job.pose_template_id);
      if (template) box.replaceChildren(skeletonCanvas(template.keypoints, 192));
      else box.textContent = job.pose_source === "image" ? "from the photo" : "from the pose photo";
    }
    this.el("job-pose-box").hidden = false;
  }

  async cancel() {
    if (!this.job) return;
    try {
      const job = await json(`/v1/generations/${this.job.id}/cancel`, { method: "POST" });
      this.render(job);
    } catch (err) {
      this.onError(err);
    }
  }
}

function extension(output) {
  const type = output.content_type || "image/png";
  return { "image/jpeg": "jpg", "image/webp": "webp" }[type] || "png";
}

