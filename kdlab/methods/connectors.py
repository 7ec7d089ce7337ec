"""The hint regressor that maps a student stage onto a teacher stage's shape, shared by FitNet
(its regressor) and AB (its connectors, without the ReLU)."""
from __future__ import annotations

from torch import Tensor, nn

from kdlab.errors import ConfigError
from kdlab.models import StageInfo


class ConvRegressor(nn.Module):
    """The hint regressor of the reference code (RepDistiller / mdistiller `ConvReg`):
    conv -> batch norm -> ReLU from the student's (C_s, H_s, W_s) map to the teacher's
    (C_t, H_t, W_t). The conv depends on the sizes:

        H_s = 2 H_t            3x3, stride 2, padding 1
        2 H_s = H_t            4x4 transposed, stride 2, padding 1
        H_s >= H_t otherwise   valid conv of kernel (1 + H_s - H_t, 1 + W_s - W_t) (1x1 if equal)

    The reference decides on heights alone; here both sides must agree (square CIFAR maps
    behave identically), and any other pair of sizes is a ConfigError.
    """

    def __init__(self, student: StageInfo, teacher: StageInfo) -> None:
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = (student.channels, student.height, student.width), (
            teacher.channels, teacher.height, teacher.width)
        if (hs, ws) == (2 * ht, 2 * wt):
            self.conv: nn.Module = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
        elif (2 * hs, 2 * ws) == (ht, wt):
            self.conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
        else:
            raise ConfigError(
                f"FitNet cannot regress a {cs}x{hs}x{ws} student map onto a {ct}x{ht}x{wt} teacher map: "
                "the regressor maps a student map of twice, half, the same or a larger size than the "
                "teacher's; choose method.guided_stage / method.hint_stage with compatible sizes"
            )
        self.bn = nn.BatchNorm2d(ct)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


__all__ = ["ConvRegressor"]
