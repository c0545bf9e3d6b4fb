// The playground: a key, the catalog, a photo and a pose, the parameters, a job followed to
// its images, the history. Only the public API; every error shown as the API's message.

import { ApiError, call, json, saveKey, savedKey } from "./api.js";
import { appendParams, buildParams, showModelDefaults, submitForm } from "./form.js";
import { History } from "./history.js";
import { JobView } from "./job.js";
import { skeletonCanvas } from "./skeleton.js";

const $ = (id) => document.getElementById(id);
const state = { models: [], templates: [], photo: null, posePhoto: null };

function showError(err) {
  const box = $("error");
  box.textContent = err instanceof ApiError || err instanceof Error ? err.message : String(err);
  box.dataset.code = err.code || "";
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

const history = new History({ onOpen: (id) => openJob(id), onError: showError });
const jobView = new JobView({
  templates: () => state.templates,
  onFinished: () => Promise.all([refreshAccount(), history.reload()]).catch(showError),
  onError: showError,
});

async function openJob(id) {
  clearError();
  try {
    await jobView.open(id);
  } catch (err) {
    showError(err);
  }
}

async function refreshAccount() {
  const me = await json("/v1/me");
  $("account-email").textContent = me.email;
  $("account-tier").textContent = me.tier;
  $("account-credits").textContent = me.credits;
  $("account").hidden = false;
}

async function connect(event) {
  event?.preventDefault();
  clearError();
  saveKey($("api-key").value.trim());
  try {
    await refreshAccount();
    const [models, templates, properties] = await Promise.all([
      json("/v1/models"),
      json("/v1/pose-templates"),
      submitForm(),
    ]);
    state.models = models.items;
    state.templates = templates.items;
    buildParams($("params"), properties);
    showModels();
    showTemplates();
    $("app").hidden = false;
    await history.reload();
  } catch (err) {
    $("app").hidden = true;
    $("account").hidden = true;
    showError(err);
  }
}

function showModels() {
  const cards = state.models.map((model) => {
    const label = document.createElement("label");
    label.className = "card";
    const available = model.enabled && !model.coming_soon;
    label.classList.toggle("disabled", !available);
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = "model";
    radio.value = model.model_key;
    radio.disabled = !available;
    radio.addEventListener("change", () => showModelDefaults($("params"), model));
    const name = document.createElement("strong");
    name.textContent = model.name;
    const facts = document.createElement("small");
    const soon = model.coming_soon ? " · coming soon" : "";
    const price = `${model.credit_cost} credit${model.credit_cost === 1 ? "" : "s"}`;
    facts.textContent = `${model.tier} · ${price} · ${model.resolution}${soon}`;
    label.append(radio, name, facts);
    return label;
  });
  $("models").replaceChildren(...cards);
  const first = $("models").querySelector("input:not(:disabled)");
  if (first) first.click();
}

function showTemplates() {
  const cards = state.templates.map((template, i) => {
    const label = document.createElement("label");
    label.className = "card pose";
    label.title = template.description;
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = "template";
    radio.value = template.key;
    radio.checked = i === 0;
    const name = document.createElement("small");
    name.textContent = template.name;
    label.append(radio, skeletonCanvas(template.keypoints), name);
    return label;
  });
  $("poses").replaceChildren(...cards);
}

function poseSource() {
  return document.querySelector("input[name=pose-source]:checked").value;
}

function showPoseSource() {
  $("poses").hidden = poseSource() !== "template";
  $("pose-photo-box").hidden = poseSource() !== "pose_image";
}

function preview(file, img) {
  img.src = URL.createObjectURL(file);
  img.hidden = false;
}

function takePhoto(file) {
  if (!file) return;
  state.photo = file;
  preview(file, $("photo-preview"));
}

async function submit(event) {
  event.preventDefault();
  clearError();
  if (!$("new-job").reportValidity()) return;
  const model = document.querySelector("input[name=model]:checked");
  if (!model) return showError(new Error("Choose a model."));
  if (!state.photo) return showError(new Error("Choose a photo."));
  const form = new FormData();
  form.append("image", state.photo, state.photo.name || "photo");
  form.append("model_key", model.value);
  if (poseSource() === "template") {
    form.append("pose_template_id", document.querySelector("input[name=template]:checked").value);
  } else if (poseSource() === "pose_image") {
    if (!state.posePhoto) return showError(new Error("Choose the photo whose pose to take."));
    form.append("pose_image", state.posePhoto, state.posePhoto.name || "pose");
  }
  appendParams($("params"), form);
  $("submit").disabled = true;
  try {
    const response = await call("/v1/generations", {
      method: "POST",
      body: form,
      headers: { "Idempotency-Key": crypto.randomUUID() },
    });
    const job = await response.json();
    refreshAccount().catch(showError);
    history.reload();
    openJob(job.id);
  } catch (err) {
    showError(err);
  } finally {
    $("submit").disabled = false;
  }
}

function wire() {
  $("api-key").value = savedKey();
  $("key-form").addEventListener("submit", connect);
  $("forget").addEventListener("click", () => {
    saveKey("");
    $("api-key").value = "";
    $("app").hidden = true;
    $("account").hidden = true;
  });
  $("photo").addEventListener("change", (e) => takePhoto(e.target.files[0]));
  $("pose-photo").addEventListener("change", (e) => {
    state.posePhoto = e.target.files[0] || null;
    if (state.posePhoto) preview(state.posePhoto, $("pose-photo-preview"));
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    takePhoto(e.dataTransfer.files[0]);
  });
  for (const radio of document.querySelectorAll("input[name=pose-source]")) {
    radio.addEventListener("change", showPoseSource);
  }
  $("new-job").addEventListener("submit", submit);
  showPoseSource();
  if (savedKey()) connect();
}

wire();
