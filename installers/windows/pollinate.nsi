; Pollinate for Windows (NSIS 3). Installs for the current user, no administrator rights:
;   %LOCALAPPDATA%\Programs\Pollinate\        the app (PyInstaller folder: pollinate.exe, no torch)
;   %LOCALAPPDATA%\Programs\Pollinate\wsl\    what the app needs to create the `Pollinate` WSL2 distribution
;                                             on its first start (Ubuntu base root file system, set-up script,
;                                             the Pollinate wheel); the app shows that set-up's progress
;   Start menu entry; optional start at sign-in (HKCU Run "Pollinate", the same value the app's Settings use)
; The uninstaller removes all of it, then asks before removing the WSL distribution (the engine and the
; models it downloaded) and before removing settings and chat history (%LOCALAPPDATA%\pollinate).
;
; Build (installers/windows/build.ps1 does all steps on Windows; makensis also runs on Linux):
;   makensis -DDIST=build\dist\pollinate -DPAYLOAD=build\wsl-payload -DVERSION=0.1.0 installers\windows\pollinate.nsi

Unicode true
!include "MUI2.nsh"
!include "LogicLib.nsh"
!include "x64.nsh"

!ifndef VERSION
  !define VERSION "0.1.0"
!endif
!ifndef DIST
  !error "define DIST: the PyInstaller folder (build\dist\pollinate)"
!endif
!ifndef PAYLOAD
  !error "define PAYLOAD: the folder with rootfs.tar.gz, setup-engine.sh and the Pollinate wheel"
!endif
!ifndef OUTFILE
  !define OUTFILE "Pollinate-${VERSION}-Setup.exe"
!endif

!define APP_EXE "pollinate.exe"
!define DISTRIBUTION "Pollinate"
!define UNINSTALL_KEY "Software\Microsoft\Windows\CurrentVersion\Uninstall\Pollinate"
!define RUN_KEY "Software\Microsoft\Windows\CurrentVersion\Run"
!define DATA_DIR "$LOCALAPPDATA\pollinate"

Name "Pollinate"
OutFile "${OUTFILE}"
InstallDir "$LOCALAPPDATA\Programs\Pollinate"
InstallDirRegKey HKCU "Software\Pollinate" "InstallDir"
RequestExecutionLevel user
SetCompressor /SOLID lzma
BrandingText "Pollinate ${VERSION}"
!define MUI_ICON "${__FILEDIR__}\pollinate.ico"
!define MUI_UNICON "${__FILEDIR__}\pollinate.ico"

Var Wsl  ; wsl.exe: in System32, which a 32-bit installer reaches as Sysnative

!define MUI_ABORTWARNING
!define MUI_WELCOMEPAGE_TEXT "Pollinate shares your GPU with a peer-to-peer swarm that runs large language models, and lets you chat with them.$\r$\n$\r$\nThe app runs on Windows; its engine runs in WSL2, in a distribution of its own named ${DISTRIBUTION} (your own Linux distributions are not touched). The app sets the engine up on its first start (a few GB download)."
!define MUI_FINISHPAGE_RUN "$INSTDIR\${APP_EXE}"
!define MUI_FINISHPAGE_RUN_TEXT "Start Pollinate now"
!insertmacro MUI_PAGE_WELCOME
!insertmacro MUI_PAGE_COMPONENTS
!insertmacro MUI_PAGE_DIRECTORY
!insertmacro MUI_PAGE_INSTFILES
!insertmacro MUI_PAGE_FINISH
!insertmacro MUI_UNPAGE_CONFIRM
!insertmacro MUI_UNPAGE_INSTFILES
!insertmacro MUI_LANGUAGE "English"

Function FindWsl
  ${If} ${RunningX64}
  ${AndIf} ${FileExists} "$WINDIR\Sysnative\wsl.exe"
    StrCpy $Wsl "$WINDIR\Sysnative\wsl.exe"
  ${Else}
    StrCpy $Wsl "$SYSDIR\wsl.exe"
  ${EndIf}
FunctionEnd

Function un.FindWsl
  ${If} ${RunningX64}
  ${AndIf} ${FileExists} "$WINDIR\Sysnative\wsl.exe"
    StrCpy $Wsl "$WINDIR\Sysnative\wsl.exe"
  ${Else}
    StrCpy $Wsl "$SYSDIR\wsl.exe"
  ${EndIf}
FunctionEnd

Section "Pollinate (required)" SecApp
  SectionIn RO
  ; An older copy may still run: close it (its engine stops with it).
  nsExec::Exec 'taskkill /IM ${APP_EXE} /F'
  Pop $0
  SetOutPath "$INSTDIR"
  File /r "${DIST}\*.*"
  SetOutPath "$INSTDIR\wsl"
  File /r "${PAYLOAD}\*.*"
  WriteUninstaller "$INSTDIR\uninstall.exe"
  WriteRegStr HKCU "Software\Pollinate" "InstallDir" "$INSTDIR"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "DisplayName" "Pollinate"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "DisplayVersion" "${VERSION}"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "Publisher" "Pollinate"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "DisplayIcon" "$INSTDIR\${APP_EXE}"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "InstallLocation" "$INSTDIR"
  WriteRegStr HKCU "${UNINSTALL_KEY}" "UninstallString" '"$INSTDIR\uninstall.exe"'
  WriteRegStr HKCU "${UNINSTALL_KEY}" "QuietUninstallString" '"$INSTDIR\uninstall.exe" /S'
  WriteRegDWORD HKCU "${UNINSTALL_KEY}" "NoModify" 1
  WriteRegDWORD HKCU "${UNINSTALL_KEY}" "NoRepair" 1

  ; WSL itself needs administrator rights and a restart: say so now (the app explains it again if needed).
  Call FindWsl
  nsExec::ExecToStack '"$Wsl" --version'
  Pop $0
  Pop $1
  ${If} $0 != 0
    MessageBox MB_OK|MB_ICONINFORMATION "Pollinate's engine needs WSL2, which is missing or too old on this PC.$\r$\n$\r$\nOpen PowerShell as administrator and run:$\r$\n    wsl --install --no-distribution$\r$\n(or 'wsl --update' if WSL is already installed), then restart Windows and start Pollinate." /SD IDOK
  ${EndIf}
SectionEnd

Section "Start menu entry" SecStartMenu
  CreateShortcut "$SMPROGRAMS\Pollinate.lnk" "$INSTDIR\${APP_EXE}" "" "$INSTDIR\${APP_EXE}" 0
SectionEnd

Section /o "Start Pollinate when I sign in" SecAutostart
  ; Same value and quoting as app/autostart.py, so the app's Settings see and change it.
  WriteRegStr HKCU "${RUN_KEY}" "Pollinate" '"$INSTDIR\${APP_EXE}" "--minimized"'
SectionEnd

!insertmacro MUI_FUNCTION_DESCRIPTION_BEGIN
  !insertmacro MUI_DESCRIPTION_TEXT ${SecApp} "The Pollinate app and what it needs to set up its engine in WSL2."
  !insertmacro MUI_DESCRIPTION_TEXT ${SecStartMenu} "A Pollinate entry in the Start menu."
  !insertmacro MUI_DESCRIPTION_TEXT ${SecAutostart} "Start Pollinate in the notification area when you sign in (change it later in Settings)."
!insertmacro MUI_FUNCTION_DESCRIPTION_END

Section "Uninstall"
  ; Close the app, then stop the distribution: an engine kept sharing in the background stops with it.
  nsExec::Exec 'taskkill /IM ${APP_EXE} /F'
  Pop $0
  Call un.FindWsl
  nsExec::Exec '"$Wsl" --terminate ${DISTRIBUTION}'
  Pop $0

  Delete "$SMPROGRAMS\Pollinate.lnk"
  DeleteRegValue HKCU "${RUN_KEY}" "Pollinate"
  DeleteRegKey HKCU "${UNINSTALL_KEY}"
  DeleteRegKey HKCU "Software\Pollinate"
  RMDir /r "$INSTDIR"

  MessageBox MB_YESNO|MB_ICONQUESTION "Also remove Pollinate's engine from WSL?$\r$\n$\r$\nThis deletes the ${DISTRIBUTION} WSL distribution: the engine, its points ledger and the models it downloaded. Your other WSL distributions are not touched." /SD IDNO IDNO keep_engine
    nsExec::ExecToStack '"$Wsl" --unregister ${DISTRIBUTION}'
    Pop $0
    Pop $1
    RMDir /r "${DATA_DIR}\wsl-distribution"
  keep_engine:

  MessageBox MB_YESNO|MB_ICONQUESTION "Also remove your Pollinate settings and chat history (${DATA_DIR})?" /SD IDNO IDNO keep_data
    RMDir /r "${DATA_DIR}"
  keep_data:
SectionEnd
