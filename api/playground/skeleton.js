// A pose drawn as an OpenPose skeleton: COCO-18 keypoints in 0..1, the limbs and colours of
// worker/engine/skeleton.py, so a template looks here as it conditions the model.

const LIMBS = [
  [2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11],
  [2, 12], [12, 13], [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18],
];
const COLORS = [
  [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
  [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
  [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
];

export function skeletonCanvas(keypoints, size = 96) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  canvas.className = "skeleton";
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, size, size);
  ctx.lineWidth = Math.max(2, size / 40);
  ctx.lineCap = "round";
  LIMBS.forEach(([a, b], i) => {
    const p = keypoints[a - 1];
    const q = keypoints[b - 1];
    if (!p || !q) return;
    ctx.strokeStyle = rgb(COLORS[i], 0.6);
    ctx.beginPath();
    ctx.moveTo(p[0] * size, p[1] * size);
    ctx.lineTo(q[0] * size, q[1] * size);
    ctx.stroke();
  });
  keypoints.forEach((p, i) => {
    if (!p) return;
    ctx.fillStyle = rgb(COLORS[i], 1);
    ctx.beginPath();
    ctx.arc(p[0] * size, p[1] * size, Math.max(2, size / 48), 0, 2 * Math.PI);
    ctx.fill();
  });
  return canvas;
}

function rgb([r, g, b], alpha) {
  return `rgba(${r}, ${g}, ${b}, ${alpha})`;
}
